"""The asynchronous client, mirroring :class:`~momentum_client.Client` method for method."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar, Unpack

import httpx
import numpy.typing as npt

from . import _flows, _steps
from ._exceptions import RequestTimeout, TransportError
from ._files import read_checkpoint, write_checkpoint
from ._flow import Flow, Request, Response, Sleep
from ._models import ModelInfo, ModelSummary, OptimizerConfig, OptimizerUpdate, ParamState, StepResult
from ._requests import DEFAULT_HEADERS, WIRES, Durability, Wire, auth_headers, normalize_base_url
from ._retry import DEFAULT_MAX_RETRIES, DEFAULT_SYNC_WAIT, RetryPolicy, check_retry_settings
from ._routing import OwnerRoutes
from ._steps import DTypes, SeenSteps, StepBack, StepOptions
from ._tensors import Array
from ._transport import BODY, PARTS, AsyncZeroCopyTransport, proxied

T = TypeVar("T")


class AsyncClient:
    """Asynchronous client for a momentum-service server; methods are those of ``Client``, awaitable.

    ``client`` is an ``httpx.AsyncClient`` to send with as-is (e.g. over ``httpx.ASGITransport``): its own timeout
    applies and :meth:`aclose` leaves it open. Otherwise the client creates a connection-pooling
    ``httpx.AsyncClient`` with ``timeout``, over ``transport`` or by default one that retries failed
    connection attempts twice. ``headers`` are added to every request either way.

    Steps retry and wait for sync steps as in ``Client`` (``max_retries``, ``sync_wait``), and tell when
    a model's steps went back as it does (``on_step_back``); with ``follow_owner=True`` it sends a model's
    requests to the replica that owns it, as ``Client`` does.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout | None = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        sync_wait: float = DEFAULT_SYNC_WAIT,
        wire: Wire = "safetensors",
        api_key: str | None = None,
        cast_gradients: bool = False,
        on_step_back: StepBack = "raise",
        follow_owner: bool = False,
    ) -> None:
        if client is not None and transport is not None:
            raise ValueError("pass either client or transport, not both")
        check_retry_settings(max_retries, sync_wait)
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {wire!r}")
        self._wire: Wire = wire
        # With cast_gradients, the parameters' dtypes as learnt from the server: gradients are cast to them.
        self._dtypes: DTypes | None = {} if cast_gradients else None
        # The steps seen per parameter: a later answer with a step not past them means steps were lost.
        self._seen = SeenSteps(on_step_back)
        self._base_url = normalize_base_url(base_url)
        self._routes = OwnerRoutes(self._base_url, enabled=follow_owner)
        self._headers = {**DEFAULT_HEADERS, **auth_headers(api_key), **(headers or {})}
        self._max_retries = max_retries
        self._sync_wait = float(sync_wait)
        # What the retries use to wait, jitter and measure sync_wait; tests replace them.
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._random = random.Random()
        self._clock: Callable[[], float] = time.monotonic
        self._owns_http = client is None
        # The SDK's own transport takes a body as parts and gives an answer as one buffer (no copies);
        # it is called directly (see _transport.direct) unless a proxy of the environment applies.
        self._direct: AsyncZeroCopyTransport | None = None
        if client is None:
            own = AsyncZeroCopyTransport(retries=2) if transport is None else None
            client = httpx.AsyncClient(transport=transport or own, timeout=timeout)
            if own is not None and not proxied(self._base_url):
                self._direct = own
        self._http = client
        self._timeouts = (
            httpx.Timeout(timeout).as_dict() if not isinstance(timeout, httpx.Timeout) else timeout.as_dict()
        )

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
        mode: str = "async",
        workers: int | None = None,
        max_staleness: int | None = None,
        durability: Durability | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
        shards: int | None = None,
        exist_ok: bool = False,
    ) -> ModelInfo:
        """Create the model; an existing model is never changed.

        If the model exists, :class:`ModelExists` is raised, or with ``exist_ok=True`` the existing
        model is returned as it is, so every worker may call this at start-up: a restarted worker
        cannot undo a changed lr or momentum. When its config differs from the one asked for, a
        :class:`ModelConfigWarning` lists the differences (``warnings.simplefilter("error",
        ModelConfigWarning)`` makes that an error). :meth:`replace_model` replaces a config.

        ``rule`` picks the momentum rule (``"pytorch"``, ``"keras"``, ``"tf1"``, ``"ema"``,
        ``"previous_delta"``); ``schedule`` the learning-rate schedule, in the API's form, e.g.
        ``{"type": "cosine", "T_max": 1000}`` (default: constant). ``mode`` says how the workers'
        pushes combine: ``"async"`` (each applied on arrival), ``"sync"`` (each step waits for
        ``workers`` pushes, which give ``worker_id`` in ``0..workers-1`` and ``base_step``, and applies
        their mean) or ``"bounded"`` (pushes give ``base_step`` and may be at most ``max_staleness``
        steps stale). ``durability`` says when a step is acknowledged with Redis: ``"step"`` (the
        default: once its log entry is in Redis) or ``{"flush_ms": N}`` (from the owner's memory, the
        log in Redis within N ms; a crash of the owner loses at most its last N ms of steps, which
        the workers hear as :class:`StepWentBack`). ``groups`` gives some parameters their own
        hyperparameters, as torch's parameter groups: ``[{"params": ["*.bias"], "weight_decay": 0.0}]``
        (names or fnmatch patterns; a parameter takes the first group naming it, else the model's).
        """
        config = OptimizerConfig(lr, momentum, dampening, nesterov, weight_decay, maximize, rule)
        info = await self._run(
            _flows.create_model(
                model, config, schedule, mode, workers, max_staleness, exist_ok, durability, groups, shards
            )
        )
        self._seen.forget(model)
        return info

    async def replace_model(
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
        mode: str = "async",
        workers: int | None = None,
        max_staleness: int | None = None,
        durability: Durability | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
        shards: int | None = None,
    ) -> ModelInfo:
        """Replace the model's whole config (or create the model); its parameters are kept, its rule
        cannot change. Fields left out take their defaults: to change a few, use :meth:`update_model`."""
        config = OptimizerConfig(lr, momentum, dampening, nesterov, weight_decay, maximize, rule)
        return await self._run(
            _flows.replace_model(model, config, schedule, mode, workers, max_staleness, durability, groups, shards)
        )

    async def update_model(
        self,
        model: str,
        *,
        schedule: Mapping[str, Any] | None = None,
        mode: str | None = None,
        workers: int | None = None,
        max_staleness: int | None = None,
        durability: Durability | None = None,
        groups: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
        **hyperparameters: Unpack[OptimizerUpdate],
    ) -> ModelInfo:
        """Change some hyperparameters, replace the schedule, change the mode, the durability and/or the
        parameter groups; they apply from the next step.

        A new ``lr`` rescales the schedule. A new ``mode`` replaces the mode with its fields;
        ``workers`` or ``max_staleness`` alone change the current mode's. ``groups`` as a list replaces the
        groups; as a dict ``{group name: changes}`` it changes those groups (``{"1": {"lr": 0.01}}``).
        Unknown names raise ``TypeError`` listing the valid ones, as does giving nothing to change.
        """
        return await self._run(
            _flows.update_model(model, hyperparameters, schedule, mode, workers, max_staleness, durability, groups)
        )

    async def list_models(self, *, page_size: int = 100) -> list[ModelSummary]:
        """Every model this client's key may read, in name order, with its rule, parameter count and steps
        (fetched ``page_size`` at a time)."""
        return await self._run(_flows.list_models(page_size))

    async def save_checkpoint(
        self, model: str, file: str | os.PathLike[str] | BinaryIO | None = None
    ) -> memoryview | None:
        """Save the model whole (values, every state buffer, each parameter's step, the config) as one
        safetensors file: written to ``file`` (a path, replaced atomically, or a binary file), or returned
        without one (a bytes-like view of the response).

        :meth:`load_checkpoint` restores it; :mod:`momentum_client.torch` converts it to and from torch's
        ``state_dict`` pair.
        """
        content = await self._run(_flows.save_checkpoint(model))
        return write_checkpoint(content, file)

    async def load_checkpoint(
        self, model: str, file: str | os.PathLike[str] | BinaryIO | bytes | memoryview, *, replace: bool = True
    ) -> ModelInfo:
        """Restore a checkpoint file (a path, a binary file or the bytes) as ``model``: created, or replaced
        whole (values, state, steps and config; the rule cannot change). ``replace=False`` only creates:
        :class:`ModelExists` if the model exists. Training on from it gives, bitwise, what the saved model
        would have given."""
        info = await self._run(_flows.load_checkpoint(model, read_checkpoint(file), replace))
        self._seen.forget(model)
        return info

    async def get_model(self, model: str) -> ModelInfo:
        """The model's optimizer configuration and parameter metadata."""
        return await self._run(_flows.get_model(model))

    async def delete_model(self, model: str) -> None:
        """Delete the model and all its parameters."""
        await self._run(_flows.delete_model(model))
        self._seen.forget(model)

    async def init_params(
        self, model: str, params: Mapping[str, npt.ArrayLike], *, exist_ok: bool = False
    ) -> dict[str, bool]:
        """Upload initial values; returns ``{name: created}``.

        ``exist_ok=False`` sets every parameter, resetting existing ones (step 0, no velocity).
        ``exist_ok=True`` creates only the missing ones and leaves existing ones untouched, which
        is safe when several workers start at once.
        """
        created = await self._run(_flows.init_params(model, params, exist_ok, self._wire))
        self._seen.forget(model, [name for name, new in created.items() if new or not exist_ok])
        return created

    async def get_params(self, model: str, names: Iterable[str] | None = None) -> dict[str, Array]:
        """Current values of all parameters, or of ``names`` only."""
        return await self._run(_flows.get_params(model, names, self._wire))

    async def get_param_state(self, model: str, name: str) -> ParamState:
        """One parameter's value, momentum buffer and step count."""
        return await self._run(_flows.get_param_state(model, name, self._wire))

    async def delete_param(self, model: str, name: str) -> None:
        """Delete one parameter."""
        await self._run(_flows.delete_param(model, name))
        self._seen.forget(model, [name])

    async def step(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        **options: Unpack[StepOptions],
    ) -> dict[str, Array]:
        """Apply one optimizer step with ``gradients``, exactly once; returns the updated values.

        ``options`` are those of :class:`StepOptions`: ``expected_steps``, ``worker_id``, ``base_step``
        and ``idempotency_key``.
        """
        return await self._run(
            _steps.step(model, gradients, options, self._retry_policy(), self._wire, self._dtypes, self._seen)
        )

    async def step_results(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        *,
        return_params: bool = True,
        **options: Unpack[StepOptions],
    ) -> dict[str, StepResult]:
        """Apply one optimizer step like :meth:`step` (same :class:`StepOptions`); returns each parameter's
        new value (``None`` with ``return_params=False``), step count and the learning rate used."""
        return await self._run(
            _steps.step_results(
                model, gradients, return_params, options, self._retry_policy(), self._wire, self._dtypes, self._seen
            )
        )

    async def push_gradients(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        **options: Unpack[StepOptions],
    ) -> dict[str, int]:
        """Apply one optimizer step like :meth:`step` (same :class:`StepOptions`), without downloading values;
        returns step counts."""
        return await self._run(
            _steps.push_gradients(model, gradients, options, self._retry_policy(), self._wire, self._dtypes, self._seen)
        )

    async def health(self) -> bool:
        """Whether the server answers its liveness probe (``False`` also when unreachable)."""
        try:
            return await self._run(_flows.probe("/healthz"))
        except TransportError:
            return False

    async def ready(self) -> bool:
        """Whether the server is ready to serve, its store reachable (``False`` also when unreachable)."""
        try:
            return await self._run(_flows.probe("/readyz"))
        except TransportError:
            return False

    async def aclose(self) -> None:
        """Close the connection pool, unless the ``httpx.AsyncClient`` was passed in."""
        if self._owns_http:
            await self._http.aclose()

    async def close(self) -> None:
        """The same as :meth:`aclose` (an alias, kept for existing code)."""
        await self.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self._max_retries, self._sync_wait, self._random.random, self._clock)

    async def _run(self, flow: Flow[T]) -> T:
        with contextlib.closing(flow):
            reply: Response | None = None
            error: TransportError | None = None
            while True:
                try:
                    instruction = flow.send(reply) if error is None else flow.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                reply, error = None, None
                if isinstance(instruction, Sleep):
                    await self._sleep(instruction.seconds)
                    continue
                try:
                    reply = await self._send(instruction)
                except TransportError as exc:
                    error = exc  # thrown into the flow, which may retry

    async def _send(self, request: Request) -> Response:
        url = self._routes.url(request.path)
        headers = {**self._headers, **request.headers}
        if request.content or request.method not in ("GET", "HEAD", "DELETE"):
            headers["Content-Length"] = str(request.length)
        try:
            if self._direct is not None:  # the body as parts, the answer as one buffer, no httpx.Client layer
                extensions = {PARTS: request.content, "timeout": self._timeouts}
                built = httpx.Request(
                    request.method, url, params=request.params, headers=headers, extensions=extensions
                )
                reply = await self._direct.handle_async_request(built)
            else:
                content = b"".join(request.content)
                built = self._http.build_request(
                    request.method, url, params=request.params, headers=headers, content=content
                )
                reply = await self._http.send(built, stream=True)
            try:
                stream = reply.extensions.get(BODY)
                body = stream.take() if stream is not None else await reply.aread()
            finally:
                await reply.aclose()
        except httpx.TimeoutException as exc:
            self._routes.forget(request.path)
            raise RequestTimeout(f"{request.method} {url} timed out: {exc!r}", method=request.method, url=url) from exc
        except httpx.RequestError as exc:
            self._routes.forget(request.path)
            raise TransportError(f"{request.method} {url} failed: {exc!r}", method=request.method, url=url) from exc
        self._routes.learn(request.path, reply.headers)
        if reply.status_code == 503 and url != self._base_url + request.path:
            self._routes.forget(request.path)  # the owner it had is not serving: ask the base URL next time
        return Response(reply.status_code, reply.headers, body, request.method, url)
