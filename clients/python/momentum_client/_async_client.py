"""The asynchronous client, mirroring :class:`~momentum_client.Client` method for method."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx
import numpy.typing as npt

from . import _base
from ._base import Flow, Request, Response
from ._exceptions import RequestTimeout, TransportError
from ._models import ModelInfo, OptimizerConfig, OptimizerUpdate, ParamState, StepResult
from ._tensors import Array

T = TypeVar("T")


class AsyncClient:
    """Asynchronous client for a momentum-service server; methods are those of ``Client``, awaitable.

    ``client`` is an ``httpx.AsyncClient`` to send with as-is (e.g. over ``httpx.ASGITransport``): its own timeout
    applies and :meth:`close` leaves it open. Otherwise the client creates a connection-pooling
    ``httpx.AsyncClient`` with ``timeout``, over ``transport`` or by default one that retries failed
    connection attempts twice. ``headers`` are added to every request either way.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout | None = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if client is not None and transport is not None:
            raise ValueError("pass either client or transport, not both")
        self._base_url = _base.normalize_base_url(base_url)
        self._headers = {**_base.DEFAULT_HEADERS, **(headers or {})}
        self._owns_http = client is None
        if client is None:
            client = httpx.AsyncClient(transport=transport or httpx.AsyncHTTPTransport(retries=2), timeout=timeout)
        self._http = client

    @property
    def base_url(self) -> str:
        """The server's base URL, without a trailing slash."""
        return self._base_url

    async def create_model(
        self,
        model: str,
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        maximize: bool = False,
        rule: str = "pytorch",
        schedule: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        """Create the model, or replace its configuration if it exists (its rule cannot change).

        ``rule`` picks the momentum rule (``"pytorch"``, ``"keras"``, ``"tf1"``, ``"ema"``,
        ``"previous_delta"``); ``schedule`` the learning-rate schedule, in the API's form, e.g.
        ``{"type": "cosine", "T_max": 1000}`` (default: constant).
        """
        config = OptimizerConfig(lr, momentum, dampening, nesterov, weight_decay, maximize, rule)
        return await self._run(_base.create_model(model, config, schedule))

    async def update_model(
        self,
        model: str,
        *,
        schedule: Mapping[str, Any] | None = None,
        **hyperparameters: Unpack[OptimizerUpdate],
    ) -> ModelInfo:
        """Change some hyperparameters and/or replace the schedule; they apply from the next step.

        A new ``lr`` rescales the schedule. Unknown names raise ``TypeError`` listing the valid ones.
        """
        return await self._run(_base.update_model(model, hyperparameters, schedule))

    async def get_model(self, model: str) -> ModelInfo:
        """The model's optimizer configuration and parameter metadata."""
        return await self._run(_base.get_model(model))

    async def delete_model(self, model: str) -> None:
        """Delete the model and all its parameters."""
        await self._run(_base.delete_model(model))

    async def init_params(
        self, model: str, params: Mapping[str, npt.ArrayLike], *, exist_ok: bool = False
    ) -> dict[str, bool]:
        """Upload initial values; returns ``{name: created}``.

        ``exist_ok=False`` sets every parameter, resetting existing ones (step 0, no velocity).
        ``exist_ok=True`` creates only the missing ones and leaves existing ones untouched, which
        is safe when several workers start at once.
        """
        return await self._run(_base.init_params(model, params, exist_ok))

    async def get_params(self, model: str, names: Iterable[str] | None = None) -> dict[str, Array]:
        """Current values of all parameters, or of ``names`` only."""
        return await self._run(_base.get_params(model, names))

    async def get_param_state(self, model: str, name: str) -> ParamState:
        """One parameter's value, momentum buffer and step count."""
        return await self._run(_base.get_param_state(model, name))

    async def delete_param(self, model: str, name: str) -> None:
        """Delete one parameter."""
        await self._run(_base.delete_param(model, name))

    async def step(self, model: str, gradients: Mapping[str, npt.ArrayLike]) -> dict[str, Array]:
        """Apply one optimizer step with ``gradients``; returns the updated values."""
        return await self._run(_base.step(model, gradients))

    async def step_results(
        self, model: str, gradients: Mapping[str, npt.ArrayLike], *, return_params: bool = True
    ) -> dict[str, StepResult]:
        """Apply one optimizer step like :meth:`step`; returns each parameter's new value
        (``None`` with ``return_params=False``), step count and the learning rate used."""
        return await self._run(_base.step_results(model, gradients, return_params))

    async def push_gradients(self, model: str, gradients: Mapping[str, npt.ArrayLike]) -> dict[str, int]:
        """Apply one optimizer step like :meth:`step`, without downloading values; returns step counts."""
        return await self._run(_base.push_gradients(model, gradients))

    async def health(self) -> bool:
        """Whether the server answers its liveness probe (``False`` also when unreachable)."""
        try:
            return await self._run(_base.probe("/healthz"))
        except TransportError:
            return False

    async def ready(self) -> bool:
        """Whether the server is ready to serve, its store reachable (``False`` also when unreachable)."""
        try:
            return await self._run(_base.probe("/readyz"))
        except TransportError:
            return False

    async def close(self) -> None:
        """Close the connection pool, unless the ``httpx.AsyncClient`` was passed in."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, flow: Flow[T]) -> T:
        with contextlib.closing(flow):
            response: Response | None = None
            while True:
                try:
                    request = next(flow) if response is None else flow.send(response)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                response = await self._send(request)

    async def _send(self, request: Request) -> Response:
        url = self._base_url + request.path
        try:
            reply = await self._http.request(
                request.method,
                url,
                params=request.params,
                headers={**self._headers, **request.headers},
                content=request.content,
            )
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"{request.method} {url} timed out: {exc!r}", method=request.method, url=url) from exc
        except httpx.RequestError as exc:
            raise TransportError(f"{request.method} {url} failed: {exc!r}", method=request.method, url=url) from exc
        return Response(reply.status_code, reply.headers, reply.content, request.method, url)
