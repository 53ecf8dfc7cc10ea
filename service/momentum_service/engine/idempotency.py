"""Idempotency keys of one model incarnation, at its owner: exactly-once steps across retries.

A key is *in flight* while its first attempt runs (a concurrent retry is a 409), then *done*
with the step's summary (a retry gets the first result, replayed). Done records are kept in
memory for the TTL, the least recently used first out beyond ``max_keys``; the journal keeps
them all (written in the same atomic batch as the step's log entry), so a key this owner does
not know (applied by an earlier owner, or forgotten) is looked up there before the step runs.
A client marks a key it has just made up (``fresh``, the SDK's first attempt) to spare the
lookup: no earlier owner can have seen it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import IdempotencyInFlight, IdempotencyKeyReused
from ..store.base import KeyRecord

__all__ = ["Guard", "Idempotency"]


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An ``Idempotency-Key``, the fingerprint of the request it came with, and whether the client
    says this is the key's first use."""

    key: str
    fingerprint: str
    fresh: bool = False


Lookup = Callable[[str], Awaitable[KeyRecord | None]]


class Guard:
    def __init__(
        self,
        ttl_s: float,
        *,
        max_keys: int | None = None,
        lookup: Lookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.max_keys, self._lookup, self._clock = ttl_s, max_keys, lookup, clock
        self._done: OrderedDict[str, tuple[KeyRecord, float]] = OrderedDict()  # key -> (record, expiry)
        self._flight: set[str] = set()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._done)

    async def begin(self, idem: Idempotency) -> KeyRecord | None:
        """None: this attempt holds the key (call :meth:`finish` or :meth:`abandon`). A record: the key's
        step was applied already (replay it). Raises for a key in flight or used with another request."""
        record = self._get(idem.key)
        if record is None and idem.key in self._flight:
            raise IdempotencyInFlight(idem.key)
        if record is None:
            self._flight.add(idem.key)  # before awaiting: a concurrent retry sees it in flight
            if self._lookup is not None and not idem.fresh:
                try:
                    record = await self._lookup(idem.key)
                except BaseException:
                    self._flight.discard(idem.key)
                    raise
                if record is not None:
                    self._flight.discard(idem.key)
                    self.remember(record)
        if record is None:
            return None
        if record.fingerprint != idem.fingerprint:
            raise IdempotencyKeyReused(idem.key)
        return record

    def finish(self, record: KeyRecord) -> None:
        """The attempt applied its step: the key is done, with the step's summary."""
        self._flight.discard(record.key)
        self.remember(record)

    def abandon(self, key: str) -> None:
        """The attempt failed without applying anything: the key is free again."""
        self._flight.discard(key)

    def remember(self, record: KeyRecord) -> None:
        self._done[record.key] = (record, self._clock() + self.ttl_s)
        self._done.move_to_end(record.key)
        while self.max_keys is not None and len(self._done) > self.max_keys:
            self._done.popitem(last=False)

    def _get(self, key: str) -> KeyRecord | None:
        now = self._clock()
        if now >= self._next_sweep:  # drop expired records now and then
            self._done = OrderedDict((k, v) for k, v in self._done.items() if v[1] > now)
            self._next_sweep = now + 10.0
        found = self._done.get(key)
        if found is None or found[1] <= now:
            return None
        self._done.move_to_end(key)
        return found[0]
