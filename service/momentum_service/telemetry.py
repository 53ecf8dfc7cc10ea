"""Prometheus metrics of one app: :class:`Telemetry`, the engine's :class:`~.engine.events.Events`
counted, plus the HTTP layer's requests, bytes, problems and the journal's latency.

Every app has its own registry (``prometheus_client.CollectorRegistry``), so that several apps in
one process (tests) never share counts. Model names are labels, but a bounded number of them
(:class:`ModelLabels`): past ``max_models`` distinct names, every other model is counted under
``model="_other"``, so that 10,000 models (or a client making names up) cannot blow up the
exposition or Prometheus.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import time
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine.events import Events
from .errors import StoreError, StoreFull, StoreUnavailable
from .store.base import Journal

log = logging.getLogger("momentum_service")

__all__ = ["CONTENT_TYPE", "ModelLabels", "Telemetry", "current", "reset_current", "set_current", "timed_journal"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
OTHER = "_other"
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STALENESS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class ModelLabels:
    """The label of a model: its name for the first ``cap`` names seen, ``_other`` for the rest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._names: set[str] = set()

    def __call__(self, model: str) -> str:
        if model in self._names:
            return model
        if len(self._names) < self.cap:
            self._names.add(model)
            return model
        return OTHER


class Telemetry(Events):
    def __init__(self, max_models: int = 100, slow_step_ms: float = 1000.0) -> None:
        self.slow_step_ms = slow_step_ms
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        self.label = ModelLabels(max_models)
        r = self.registry
        self.requests = Counter(
            "momentum_http_requests",
            "HTTP requests answered, by route kind and status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "momentum_http_request_duration_seconds",
            "Time from a request's arrival to its response's last byte, by route kind",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.bytes_in = Counter("momentum_http_request_bytes", "Request body bytes read", ["route"], registry=r)
        self.bytes_out = Counter("momentum_http_response_bytes", "Response body bytes sent", ["route"], registry=r)
        self.problems = Counter(
            "momentum_problems",
            "Error responses (problem+json) by status and problem type (the slug of its type URN)",
            ["status", "type"],
            registry=r,
        )
        self.pushes = Counter(
            "momentum_pushes",
            "Pushes by outcome: applied, replayed (an Idempotency-Key seen before), contributed (sync) or pending "
            "(sync, answered 202)",
            ["model", "outcome"],
            registry=r,
        )
        self.steps = Counter("momentum_steps", "Updates applied (a push, or a whole sync step)", ["model"], registry=r)
        self.param_updates = Counter(
            "momentum_param_updates",
            "Parameter updates applied (an update of n parameters counts n)",
            ["model"],
            registry=r,
        )
        self.staleness = Histogram(
            "momentum_push_staleness_steps",
            "Staleness of pushes that gave a base_step: updates applied to their parameters since it",
            ["model"],
            buckets=_STALENESS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "momentum_step_duration_seconds",
            "Server time of a step request, from its body read to its response built",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.sync_wait = Histogram(
            "momentum_sync_wait_seconds",
            "How long sync pushes waited for the other workers (until applied, or 202 at the sync timeout)",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.store_seconds = Histogram(
            "momentum_store_duration_seconds",
            "Journal (Redis) calls' latency, by operation",
            ["op"],
            buckets=_LATENCY,
            registry=r,
        )
        self.store_errors = Counter(
            "momentum_store_errors", "Journal calls that failed, by operation and error", ["op", "error"], registry=r
        )
        self.owner_changes = Counter(
            "momentum_owner_changes",
            "Models this replica took (built from the journal), released (idle) or lost (another took over)",
            ["event"],
            registry=r,
        )
        self.owned = Gauge("momentum_models_owned", "Models this replica owns now (read at each scrape)", registry=r)
        self.log_bytes = Gauge(
            "momentum_log_bytes",
            "Bytes of a model's log since its last snapshot (in the journal)",
            ["model"],
            registry=r,
        )
        self.written_bytes = Counter(
            "momentum_journal_written_bytes",
            "Bytes of log entries and snapshots written",
            ["model", "kind"],
            registry=r,
        )
        self.snapshots = Counter("momentum_snapshots", "Snapshots written", ["model"], registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: prometheus-client validates and locks on every call
        (about 4% of a small step's server CPU, with the counters of one step). Labels are bounded (models
        past the cap share ``_other``) and never removed, so the cache stays small and right."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # Engine events.

    def pushed(self, model: str, outcome: str, staleness: int | None = None) -> None:
        label = self.label(model)
        self.child(self.pushes, label, outcome).inc()
        if staleness is not None:
            self.child(self.staleness, label).observe(staleness)

    def stepped(self, model: str, params: int) -> None:
        label = self.label(model)
        self.child(self.steps, label).inc()
        self.child(self.param_updates, label).inc(params)

    def sync_waited(self, model: str, seconds: float) -> None:
        self.child(self.sync_wait, self.label(model)).observe(seconds)

    def owner_changed(self, model: str, event: str) -> None:
        self.child(self.owner_changes, event).inc()

    def written(self, model: str, nbytes: int, snapshot: bool, log_bytes: int) -> None:
        label = self.label(model)
        self.child(self.written_bytes, label, "snapshot" if snapshot else "log").inc(nbytes)
        if snapshot:
            self.child(self.snapshots, label).inc()
        self.child(self.log_bytes, label).set(log_bytes)

    # The HTTP layer.

    def problem(self, status: int, slug: str) -> None:
        self.child(self.problems, str(status), slug).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_CURRENT: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar("momentum_telemetry", default=None)


def current() -> Telemetry | None:
    """The telemetry of the app handling the current request (set by admission), if any."""
    return _CURRENT.get()


def set_current(telemetry: Telemetry | None) -> contextvars.Token[Telemetry | None]:
    return _CURRENT.set(telemetry)


def reset_current(token: contextvars.Token[Telemetry | None]) -> None:
    _CURRENT.reset(token)


def timed_journal(journal: Journal, telemetry: Telemetry) -> Journal:
    """``journal`` with every call's latency (and failures) counted by operation."""
    return cast(Journal, _Timed(journal, telemetry))


class _Timed:
    """Counts each call, and logs when the journal starts failing and when it recovers (once each,
    not per request: the requests' own 503s say the rest)."""

    def __init__(self, journal: Journal, telemetry: Telemetry) -> None:
        self._journal, self._telemetry = journal, telemetry
        self.kind, self.durable, self.replicated = journal.kind, journal.durable, journal.replicated
        self._failing_since: float | None = None
        self._failures = 0

    def _failed(self, op: str, exc: Exception) -> None:
        if not isinstance(exc, StoreUnavailable | StoreFull | StoreError):
            return  # a domain answer (fenced, a key taken...), not a failing store
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("store failing: %s %s: %s", self.kind, op, exc)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "store recovered: %s answers again after %.1f s and %d failed calls",
                self.kind,
                time.monotonic() - self._failing_since,
                self._failures,
            )
            self._failing_since, self._failures = None, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._journal, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        seconds = self._telemetry.store_seconds.labels(name)
        errors = self._telemetry.store_errors

        @functools.wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await attr(*args, **kwargs)
            except Exception as exc:
                errors.labels(name, type(exc).__name__).inc()
                self._failed(name, exc)
                raise
            finally:
                seconds.observe(time.perf_counter() - start)
            self._succeeded()
            return result

        setattr(self, name, timed)  # built once per operation
        return timed
