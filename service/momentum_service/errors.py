"""Domain errors, raised by the stores and the engine and mapped to HTTP by ``api.problems``.

They carry what went wrong in domain terms; they know nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to clients."""


LISTED = 20
"""An error names at most this many parameters (and says how many more): a request naming a
million unknown parameters must not get an answer bigger than itself."""


def listed(names: Iterable[str]) -> str:
    """``'a', 'b', ...``: at most :data:`LISTED` names, then how many more there are."""
    names = list(names)
    shown = ", ".join(map(repr, names[:LISTED]))
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


class ModelNotFound(ServiceError):
    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} does not exist")
        self.model = model


class ModelExists(ServiceError):
    """A create-only ``PUT`` (``If-None-Match: *``) found the model; nothing was written."""

    def __init__(self, model: str, config: Mapping[str, Any]) -> None:
        super().__init__(
            f"model {model!r} already exists; nothing was changed (its config is in 'existing'; "
            "PATCH it to change some hyperparameters, or PUT without If-None-Match to replace its config)"
        )
        self.model = model
        self.config = dict(config)


class ParamNotFound(ServiceError):
    def __init__(self, model: str, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)
        super().__init__(f"model {model!r} has no parameter(s) {listed(self.names)}")


class ParamsExist(ServiceError):
    """An If-None-Match: * write found parameters that already exist (nothing was written)."""

    def __init__(self, model: str, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)
        super().__init__(f"model {model!r} already has parameter(s) {listed(self.names)}")


class TensorMismatch(ServiceError):
    """Gradients whose shape or dtype differ from their parameters' (nothing was applied)."""

    def __init__(self, model: str, mismatches: Mapping[str, Mapping[str, Any]]) -> None:
        self.model = model
        self.mismatches = dict(mismatches)
        parts = [
            f"{name!r}: expected {m['expected']['dtype']}{list(m['expected']['shape'])}, "
            f"got {m['got']['dtype']}{list(m['got']['shape'])}"
            for name, m in sorted(self.mismatches.items())[:LISTED]
        ]
        more = len(self.mismatches) - LISTED
        tail = f"; and {more} more" if more > 0 else ""
        super().__init__("gradient does not match its parameter: " + "; ".join(parts) + tail)


class InvalidConfig(ServiceError):
    """A model config that the rule, the schedule or the mode rejects.

    ``field`` is the part at fault (``optimizer``, ``schedule``, or a mode field such as
    ``workers``) and ``path`` where within it (``("lr",)``, ``("schedulers", 1, "step_size")``).
    """

    def __init__(self, message: str, field: str = "optimizer", path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.path = path


class RuleChange(ServiceError):
    """A config that would change an existing model's rule (its velocities would change meaning)."""

    def __init__(self, model: str, current: str, requested: str) -> None:
        self.model, self.current, self.requested = model, current, requested
        super().__init__(
            f"model {model!r} uses rule {current!r}; a model's rule is fixed when it is created, because "
            f"each rule's velocity means something else. Delete the model and create it with rule {requested!r}."
        )


class NonFiniteResult(ServiceError):
    """The update would overflow a value or velocity to infinity or NaN (nothing was applied)."""


class StoreUnavailable(ServiceError):
    """The store cannot be reached, or timed out.

    Nothing changed, except possibly for a step whose commit was under way (its message says so).
    """


class StoreFull(ServiceError):
    """The store refused a write because it is at its memory limit (Redis ``maxmemory``).

    Nothing was changed: the store refuses the whole operation before it starts. Deleting
    models or parameters always works, and frees memory.
    """


class StoreError(ServiceError):
    """The store answered with an error that is neither unavailability nor a full store.

    A bug, or a store set up wrongly (an ACL that lacks a command, say): retrying will not help.
    Nothing was changed (every store operation checks before it writes).
    """


class Contention(ServiceError):
    """An update kept losing optimistic-concurrency races; the client should retry later."""


class StepMismatch(ServiceError):
    """``expected_steps`` differ from the parameters' current steps (nothing was applied)."""

    def __init__(self, model: str, current: Mapping[str, int], expected: Mapping[str, int]) -> None:
        self.model = model
        self.current = dict(current)
        diffs = [
            f"{n!r} is at step {current[n]}, not {expected[n]}" for n in sorted(expected) if current[n] != expected[n]
        ]
        more = f"; and {len(diffs) - LISTED} more" if len(diffs) > LISTED else ""
        super().__init__("parameter versions moved on: " + "; ".join(diffs[:LISTED]) + more + "; nothing was applied")


class IdempotencyKeyReused(ServiceError):
    """An Idempotency-Key sent again with a different request."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request; use a new key")


class IdempotencyInFlight(ServiceError):
    """A retry arrived while the first attempt with its Idempotency-Key is still being processed."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(
            f"a request with Idempotency-Key {key!r} is still being processed; retry with the same key shortly"
        )


class ModeFieldRequired(ServiceError):
    """A push without a field its model's mode needs (``worker_id``, ``base_step``)."""

    def __init__(self, model: str, mode: str, field: str) -> None:
        self.field = field
        super().__init__(f"model {model!r} is in {mode} mode: each push must carry {field}")


class StaleGradient(ServiceError):
    """A push whose base step is too old (bounded mode), or ahead of the parameters (nothing applied)."""

    def __init__(self, message: str, current: Mapping[str, int]) -> None:
        self.current = dict(current)
        super().__init__(message)


class StepAlreadyApplied(ServiceError):
    """A sync contribution for a step that was applied without this worker (nothing was added)."""

    def __init__(self, model: str, base_step: int, current: Mapping[str, int]) -> None:
        self.current = dict(current)
        super().__init__(
            f"step {base_step} of model {model!r} was applied already, without this worker's contribution; "
            "push the gradient of the current step instead"
        )


class WorkerOutOfRange(ServiceError):
    """A sync push whose ``worker_id`` is not one of the model's ``0..workers-1`` (nothing was added)."""

    def __init__(self, model: str, worker_id: int, workers: int) -> None:
        self.worker_id, self.workers = worker_id, workers
        super().__init__(
            f"model {model!r} is in sync mode with {workers} worker(s): worker_id must be between 0 and "
            f"{workers - 1}, got {worker_id}"
        )


class OwnerLost(StoreUnavailable):
    """This server stopped serving the model (its lease lapsed or was taken over, or a write to the
    journal failed): retry, and the model's current owner answers."""


class NotOwner(ServiceError):
    """The model is served by another server (the HTTP layer forwards requests to it)."""

    def __init__(self, model: str, url: str, replica: str) -> None:
        super().__init__(f"model {model!r} is served by another server ({url})")
        self.model, self.url, self.replica = model, url, replica


class OwnerUnreachable(StoreUnavailable):
    """The server that owns the model did not answer a forwarded request."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Fenced(ServiceError):
    """A write refused because the writer's lease is no longer the model's current one: another
    process owns the model now (or the model's head moved on). Nothing was written."""


class KeyTaken(ServiceError):
    """A batch carried an idempotency key that the journal already has as applied (written by an
    earlier owner): nothing of the batch was written."""

    def __init__(self, key: str, fingerprint: str, summary: str) -> None:
        super().__init__(f"idempotency key {key!r} was applied already")
        self.key, self.fingerprint, self.summary = key, fingerprint, summary
