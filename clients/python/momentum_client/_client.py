"""The synchronous client."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from ._transport import BODY, PARTS, ZeroCopyTransport, proxied

T = TypeVar("T")


class Client:
    """Synchronous client for a momentum-service server.

    ``client`` is an ``httpx.Client`` to send with as-is (e.g. a starlette ``TestClient``): its own timeout
    applies and :meth:`close` leaves it open. Otherwise the client creates a connection-pooling
    ``httpx.Client`` with ``timeout``, over ``transport`` or by default one that retries failed
    connection attempts twice. ``headers`` are added to every request either way.

    Steps (:meth:`step`, :meth:`step_results`, :meth:`push_gradients`) are exactly-once: each call
    sends an ``Idempotency-Key`` and, when the request got no response (:class:`TransportError`,
    including timeouts), a 503 or a 409 ``idempotency-in-flight``, re-sends the same bytes with the
    same key, so the server applies the step once however many attempts reach it. Up to
    ``max_retries`` retries in a row (0 disables them), after the answer's ``Retry-After`` or else
    a backoff with full jitter (random up to 0.05 s, doubling per retry, at most 2 s); then the last
    error is raised. In ``sync`` mode a step that waits for other workers (202) is re-sent until it
    is applied, for up to ``sync_wait`` seconds, then :class:`StepTimeout` is raised. Other calls
    are not retried (beyond the default transport's connection retries).

    ``api_key`` (default: the ``MOMENTUM_API_KEY`` environment variable) is sent as
    ``Authorization: Bearer <key>`` with every request.

    Tensors travel in safetensors by default (``wire="safetensors"``): exact, and far cheaper than
    JSON for large tensors; ``wire="json"`` sends and receives JSON tensors instead.

    A parameter's step count only grows, so a step that comes back with a step count not past one
    this client saw before means acknowledged steps were lost (a ``flush_ms`` model's owner crashed,
    or the model was re-created): :class:`StepWentBack` is raised after the step was applied (its
    ``result`` holds the answer), or with ``on_step_back="warn"`` a :class:`StepWentBackWarning`.

    With ``follow_owner=True``, a model's requests go straight to the server replica that owns it, once
    a replica that forwarded one named it (``Momentum-Owner``): one hop instead of two when several
    replicas serve, back to ``base_url`` when that owner does not answer. Off by default: the replicas'
    own URLs must be reachable from here (not only a load balancer's), and the API key goes to them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float | httpx.Timeout | None = 10.0,
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
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
        self._sleep: Callable[[float], None] = time.sleep
        self._random = random.Random()
        self._clock: Callable[[], float] = time.monotonic
        self._owns_http = client is None
        # The SDK's own transport takes a body as parts and gives an answer as one buffer (no copies);
        # it is called directly (see _transport.direct) unless a proxy of the environment applies.
        self._direct: ZeroCopyTransport | None = None
        if client is None:
            own = ZeroCopyTransport(retries=2) if transport is None else None
            client = httpx.Client(transport=transport or own, timeout=timeout)
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

    def create_model(
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
        ``shards`` (2 to 64; async mode) splits the model's parameters over that many owners, on distinct
        server replicas when there are as many: see the README's "Scaling out" for what a step guarantees.
        """
        config = OptimizerConfig(lr, momentum, dampening, nesterov, weight_decay, maximize, rule)
        info = self._run(
            _flows.create_model(
                model, config, schedule, mode, workers, max_staleness, exist_ok, durability, groups, shards
            )
        )
        self._seen.forget(model)
        return info

    def replace_model(
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
        return self._run(
            _flows.replace_model(model, config, schedule, mode, workers, max_staleness, durability, groups, shards)
        )

    def update_model(
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
        return self._run(
            _flows.update_model(model, hyperparameters, schedule, mode, workers, max_staleness, durability, groups)
        )

    def list_models(self, *, page_size: int = 100) -> list[ModelSummary]:
        """Every model this client's key may read, in name order, with its rule, parameter count and steps
        (fetched ``page_size`` at a time)."""
        return self._run(_flows.list_models(page_size))

    def save_checkpoint(self, model: str, file: str | os.PathLike[str] | BinaryIO | None = None) -> memoryview | None:
        """Save the model whole (values, every state buffer, each parameter's step, the config) as one
        safetensors file: written to ``file`` (a path, replaced atomically, or a binary file), or returned
        without one (a bytes-like view of the response).

        :meth:`load_checkpoint` restores it; :mod:`momentum_client.torch` converts it to and from torch's
        ``state_dict`` pair.
        """
        content = self._run(_flows.save_checkpoint(model))
        return write_checkpoint(content, file)

    def load_checkpoint(
        self, model: str, file: str | os.PathLike[str] | BinaryIO | bytes | memoryview, *, replace: bool = True
    ) -> ModelInfo:
        """Restore a checkpoint file (a path, a binary file or the bytes) as ``model``: created, or replaced
        whole (values, state, steps and config; the rule cannot change). ``replace=False`` only creates:
        :class:`ModelExists` if the model exists. Training on from it gives, bitwise, what the saved model
        would have given."""
        info = self._run(_flows.load_checkpoint(model, read_checkpoint(file), replace))
        self._seen.forget(model)
        return info

    def get_model(self, model: str) -> ModelInfo:
        """The model's optimizer configuration and parameter metadata."""
        return self._run(_flows.get_model(model))

    def delete_model(self, model: str) -> None:
        """Delete the model and all its parameters."""
        self._run(_flows.delete_model(model))
        self._seen.forget(model)

    def init_params(
        self, model: str, params: Mapping[str, npt.ArrayLike], *, exist_ok: bool = False
    ) -> dict[str, bool]:
        """Upload initial values; returns ``{name: created}``.

        ``exist_ok=False`` sets every parameter, resetting existing ones (step 0, no velocity).
        ``exist_ok=True`` creates only the missing ones and leaves existing ones untouched, which
        is safe when several workers start at once.
        """
        created = self._run(_flows.init_params(model, params, exist_ok, self._wire))
        self._seen.forget(model, [name for name, new in created.items() if new or not exist_ok])
        return created

    def get_params(self, model: str, names: Iterable[str] | None = None) -> dict[str, Array]:
        """Current values of all parameters, or of ``names`` only."""
        return self._run(_flows.get_params(model, names, self._wire))

    def get_param_state(self, model: str, name: str) -> ParamState:
        """One parameter's value, momentum buffer and step count."""
        return self._run(_flows.get_param_state(model, name, self._wire))

    def delete_param(self, model: str, name: str) -> None:
        """Delete one parameter."""
        self._run(_flows.delete_param(model, name))
        self._seen.forget(model, [name])

    def step(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        **options: Unpack[StepOptions],
    ) -> dict[str, Array]:
        """Apply one optimizer step with ``gradients``, exactly once; returns the updated values.

        ``options`` are those of :class:`StepOptions`: ``expected_steps``, ``worker_id``, ``base_step``
        and ``idempotency_key``.
        """
        return self._run(
            _steps.step(model, gradients, options, self._retry_policy(), self._wire, self._dtypes, self._seen)
        )

    def step_results(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        *,
        return_params: bool = True,
        **options: Unpack[StepOptions],
    ) -> dict[str, StepResult]:
        """Apply one optimizer step like :meth:`step` (same :class:`StepOptions`); returns each parameter's
        new value (``None`` with ``return_params=False``), step count and the learning rate used."""
        return self._run(
            _steps.step_results(
                model, gradients, return_params, options, self._retry_policy(), self._wire, self._dtypes, self._seen
            )
        )

    def push_gradients(
        self,
        model: str,
        gradients: Mapping[str, npt.ArrayLike],
        **options: Unpack[StepOptions],
    ) -> dict[str, int]:
        """Apply one optimizer step like :meth:`step` (same :class:`StepOptions`), without downloading values;
        returns step counts."""
        return self._run(
            _steps.push_gradients(model, gradients, options, self._retry_policy(), self._wire, self._dtypes, self._seen)
        )

    def health(self) -> bool:
        """Whether the server answers its liveness probe (``False`` also when unreachable)."""
        try:
            return self._run(_flows.probe("/healthz"))
        except TransportError:
            return False

    def ready(self) -> bool:
        """Whether the server is ready to serve, its store reachable (``False`` also when unreachable)."""
        try:
            return self._run(_flows.probe("/readyz"))
        except TransportError:
            return False

    def close(self) -> None:
        """Close the connection pool, unless the ``httpx.Client`` was passed in."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self._max_retries, self._sync_wait, self._random.random, self._clock)

    def _run(self, flow: Flow[T]) -> T:
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
                    self._sleep(instruction.seconds)
                    continue
                try:
                    reply = self._send(instruction)
                except TransportError as exc:
                    error = exc  # thrown into the flow, which may retry

    def _send(self, request: Request) -> Response:
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
                reply = self._direct.handle_request(built)
            else:
                content = b"".join(request.content)
                built = self._http.build_request(
                    request.method, url, params=request.params, headers=headers, content=content
                )
                reply = self._http.send(built, stream=True)
            try:
                stream = reply.extensions.get(BODY)
                body = stream.take() if stream is not None else reply.read()
            finally:
                reply.close()
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


def check_server_arguments(client: Client | None, url: str | None, api_key: str | None) -> None:
    """What the optimizers (``momentum_client.torch``, ``.keras``) take to reach the server: ``url=`` (with
    ``api_key=``) or ``client=``, not both; ``ValueError`` otherwise."""
    if client is None and url is None:
        raise ValueError("RemoteSGD needs the server: pass url= (and api_key=) or client=")
    if client is not None:
        if url is not None and url.rstrip("/") != client.base_url:
            raise ValueError(f"pass either client= or url=, not both (url={url!r}, client at {client.base_url!r})")
        if api_key is not None:
            raise ValueError("api_key= goes with url=; a client passed as client= has its own")
