"""When and how long the step flows wait before re-sending: :class:`RetryPolicy` and its defaults,
:func:`check_retry_settings`, and :func:`is_transient` (which answers are worth a retry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._errors import error_from_response
from ._flow import Response

DEFAULT_MAX_RETRIES = 5
DEFAULT_SYNC_WAIT = 300.0
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


def check_retry_settings(max_retries: int, sync_wait: float) -> None:
    """``TypeError``/``ValueError`` unless ``max_retries`` is an int >= 0 and ``sync_wait`` a number >= 0."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError(f"max_retries must be an int, got {max_retries!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if isinstance(sync_wait, bool) or not isinstance(sync_wait, (int, float)):
        raise TypeError(f"sync_wait must be a number of seconds, got {sync_wait!r}")
    if not sync_wait >= 0:  # also refuses NaN
        raise ValueError(f"sync_wait must be >= 0 seconds, got {sync_wait}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step flow retries.

    A transient failure (no response, 503, 409 ``idempotency-in-flight``) is retried up to
    ``max_retries`` times in a row, after ``Retry-After`` if the answer has one, else a full-jitter
    exponential backoff ``random() * min(max_delay, base_delay * 2**n)`` for the n-th retry in a
    row (n from 0); a delay never exceeds ``max_delay``. A sync step's 202 re-sends the push until
    ``sync_wait`` seconds of ``clock`` have passed since the first attempt. ``random`` returns
    floats in [0, 1).
    """

    max_retries: int
    sync_wait: float
    random: Callable[[], float]
    clock: Callable[[], float]
    base_delay: float = BACKOFF_BASE
    max_delay: float = BACKOFF_CAP

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before the ``retry``-th retry in a row (from 0)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return self.random() * min(self.max_delay, self.base_delay * 2.0 ** min(retry, 64))


def is_transient(response: Response) -> bool:
    """Whether re-sending the same request (with the same ``Idempotency-Key``) may succeed."""
    if response.status in (502, 503, 504):  # unavailable, or a proxy lost the upstream's answer
        return True
    return response.status == 409 and error_from_response(response).code == "idempotency-in-flight"
