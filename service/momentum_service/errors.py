"""Domain errors, raised by the stores and the engine and mapped to HTTP by ``api.problems``.

They carry what went wrong in domain terms; they know nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to clients."""


class ModelNotFound(ServiceError):
    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} does not exist")
        self.model = model


class ParamNotFound(ServiceError):
    def __init__(self, model: str, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)
        super().__init__(f"model {model!r} has no parameter(s) {', '.join(map(repr, self.names))}")


class ParamsExist(ServiceError):
    """An If-None-Match: * write found parameters that already exist (nothing was written)."""

    def __init__(self, model: str, names: Iterable[str]) -> None:
        self.model = model
        self.names = sorted(names)
        super().__init__(f"model {model!r} already has parameter(s) {', '.join(map(repr, self.names))}")


class TensorMismatch(ServiceError):
    """Gradients whose shape or dtype differ from their parameters' (nothing was applied)."""

    def __init__(self, model: str, mismatches: Mapping[str, Mapping[str, Any]]) -> None:
        self.model = model
        self.mismatches = dict(mismatches)
        parts = [
            f"{name!r}: expected {m['expected']['dtype']}{list(m['expected']['shape'])}, "
            f"got {m['got']['dtype']}{list(m['got']['shape'])}"
            for name, m in sorted(self.mismatches.items())
        ]
        super().__init__("gradient does not match its parameter: " + "; ".join(parts))


class InvalidConfig(ServiceError):
    """Hyperparameters that the momentum rule rejects."""


class NonFiniteResult(ServiceError):
    """The update would overflow a value or velocity to infinity or NaN (nothing was applied)."""


class StoreUnavailable(ServiceError):
    """The store cannot be reached, or timed out.

    Nothing changed, except possibly for a step whose commit was under way (its message says so).
    """


class Contention(ServiceError):
    """An update kept losing optimistic-concurrency races; the client should retry later."""
