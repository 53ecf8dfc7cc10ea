"""The Redis store: state lives in Redis, shared by every server process that uses it.

Writes are Lua scripts from :mod:`.scripts` (atomic, all-or-nothing, refused before they run
when Redis is full). Reads are pipelined into one round trip. Redis errors become domain
errors by what a client should do about them (see :func:`_guard`).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from ..errors import ModelExists, ModelNotFound, ParamNotFound, ParamsExist, StoreError, StoreFull, StoreUnavailable
from . import scripts
from .base import (
    Array,
    Claim,
    ClaimState,
    CommitOutcome,
    Contribution,
    ModelRecord,
    ParamMeta,
    ParamRecord,
    ParamUpdate,
    new_token,
)
from .keys import Keys, parse_sync_field

# Stored little-endian whatever the host; decoded to native order (a no-op on x86 and ARM).
_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_PARAM_FIELDS = ("shape", "dtype", "step", "etag", "value")


@asynccontextmanager
async def _guard() -> AsyncIterator[None]:
    """Redis errors as domain errors, by what the client should do about them.

    Unreachable, timed out, loading, read-only (a replica), busy with a script: 503, retry.
    At its memory limit: :class:`StoreFull` (nothing was written: writing scripts are refused
    before they run). Anything else (a script error, a wrong type, a command the ACL lacks) is not
    Redis being down, and retrying will not help: :class:`StoreError`.
    """
    try:
        yield
    except OutOfMemoryError as exc:
        raise StoreFull(
            f"Redis is at its memory limit (maxmemory) and refused the write; nothing was changed: {exc}. "
            "Delete models or parameters (always allowed) or raise maxmemory"
        ) from exc
    except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, ClusterDownError, TryAgainError) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    except ResponseError as exc:
        if str(exc).startswith(("BUSY", "LOADING", "MASTERDOWN")):
            raise StoreUnavailable(f"redis: {exc}") from exc
        raise StoreError(f"redis answered an error: {type(exc).__name__}: {exc}") from exc
    except RedisError as exc:
        raise StoreError(f"redis: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc


def _encode(a: Array) -> memoryview:
    """The array's little-endian bytes, without a copy when it already is contiguous little-endian."""
    contiguous: Any = a if a.flags.c_contiguous and a.dtype.byteorder in _LITTLE else _little(a)
    return memoryview(contiguous).cast("B")


_LITTLE = ("<", "=", "|") if np.little_endian else ("<", "|")


def _little(a: Array) -> Array:
    out: Array = np.ascontiguousarray(a, dtype=_DTYPES[a.dtype.name])
    return out


def _decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> Array:
    a: Array = np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)
    return a.astype(a.dtype.newbyteorder("="), copy=False)  # read-only when no copy was needed


# An OrderedDict entry (hash, key and value pointers, links) and its key, a (model, name) tuple.
_ENTRY_OVERHEAD = 160
# The bytes object that a view's data lives in (from Redis), besides its data.
_BYTES_OVERHEAD = sys.getsizeof(b"")


class StateCache:
    """Parameter states this process holds, least recently used first out, within a byte budget.

    An entry is only ever used when its etag is the one Redis has, so a stale entry is never
    served: it is replaced at the next read.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, str], ParamRecord] = OrderedDict()

    @staticmethod
    def _size(rec: ParamRecord) -> int:
        """What an entry really holds: the arrays (data and objects), the record, its strings, the
        dict entry and its key. A tiny parameter costs several hundred bytes besides its data."""
        size = sys.getsizeof(rec) + sys.getsizeof(rec.name) * 2 + sys.getsizeof(rec.etag) + _ENTRY_OVERHEAD
        for a in (rec.value, rec.velocity):
            if a is not None:
                size += sys.getsizeof(a) + (0 if a.flags.owndata else a.nbytes + _BYTES_OVERHEAD)
        return size

    def get(self, model: str, name: str, etag: str) -> ParamRecord | None:
        rec = self._entries.get((model, name))
        if rec is None or rec.etag != etag:
            return None
        self._entries.move_to_end((model, name))
        return rec

    def put(self, model: str, rec: ParamRecord) -> None:
        self.drop(model, rec.name)
        size = self._size(rec)
        if size > self.max_bytes:
            return
        for a in (rec.value, rec.velocity):
            if a is not None and a.flags.writeable:
                a.flags.writeable = False  # shared with callers: nobody may change it in place
        self._entries[(model, rec.name)] = rec
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= self._size(old)

    def drop(self, model: str, name: str | None = None) -> None:
        keys = [(model, name)] if name is not None else [k for k in self._entries if k[0] == model]
        for key in keys:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= self._size(old)


class RedisStore:
    kind = "redis"

    def __init__(self, client: aioredis.Redis, prefix: str = "momentum", *, cache_bytes: int = 512 << 20) -> None:
        self._redis = client
        self._cache = StateCache(cache_bytes)
        self.keys = Keys(prefix)
        # Each model's current incarnation as last read from its head (every key but the head
        # carries it; scripts check it, and a mismatch makes the store read the head again).
        self._incs: dict[str, str] = {}
        self._put_model = client.register_script(scripts.PUT_MODEL)
        self._replace_config = client.register_script(scripts.REPLACE_CONFIG)
        self._put_params = client.register_script(scripts.PUT_PARAMS)
        self._commit_step = client.register_script(scripts.COMMIT_STEP)
        self._delete_param = client.register_script(scripts.DELETE_PARAM)
        self._delete_model = client.register_script(scripts.DELETE_MODEL)
        self._claim = client.register_script(scripts.CLAIM)
        self._release = client.register_script(scripts.RELEASE)
        self._contribute = client.register_script(scripts.CONTRIBUTE)
        self._drop_contributions = client.register_script(scripts.DROP_CONTRIBUTIONS)
        self._read_meta = client.register_script(scripts.READ_META)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "momentum", timeout: float = 2.0, cache_bytes: int = 512 << 20
    ) -> RedisStore:
        """A store on a new connection pool.

        redis-py's default policy retries a failed command 10 times with growing pauses, which
        turns an unresponsive Redis into a request that hangs for a minute. Here a command is
        tried at most 3 times, 25-100 ms apart: a request gets its 503 within about
        ``3 * timeout + 0.2`` seconds. Re-sent writes are harmless (see :mod:`.scripts`).
        No periodic health check: its PING runs under the same retry policy *inside* each
        attempt, so on a new or idle connection a frozen Redis took up to 9 timeouts; a stale
        connection fails its command instead, which is retried on a fresh one.
        """
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.025), retries=2),
        )
        return cls(client, prefix, cache_bytes=cache_bytes)

    async def ping(self) -> None:
        async with _guard():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    async def _inc(self, model: str, *, fresh: bool = False) -> str:
        """The model's current incarnation (ModelNotFound without the model)."""
        inc = None if fresh else self._incs.get(model)
        if inc is None:
            async with _guard():
                raw = await self._redis.hget(self.keys.model(model), "inc")
            if raw is None:
                self._forget(model)
                raise ModelNotFound(model)
            inc = self._incs[model] = _text(raw)
        return inc

    def _forget(self, model: str) -> None:
        self._incs.pop(model, None)
        self._cache.drop(model)

    async def put_model(
        self, model: str, config: dict[str, Any], *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        rev, inc = new_token(), new_token()
        args = [json.dumps(config), rev, inc, "1" if only_create else "0"]
        async with _guard():
            res = await self._put_model(keys=[self.keys.model(model)], args=args)
        code = int(res[0])
        if code == 0:
            raise ModelExists(model, json.loads(res[1]))
        if self._incs.get(model) != _text(res[1]):
            self._forget(model)
        self._incs[model] = _text(res[1])
        return ModelRecord(model, config, rev), code == 1

    async def get_model(self, model: str) -> ModelRecord | None:
        async with _guard():
            raw = await self._redis.hmget(self.keys.model(model), ["config", "rev"])
        return _model_record(model, raw)

    async def replace_config(self, model: str, expected_rev: str, config: dict[str, Any]) -> ModelRecord | None:
        rev = new_token()
        async with _guard():
            res = await self._replace_config(
                keys=[self.keys.model(model)], args=[expected_rev, json.dumps(config), rev]
            )
        if res == -1:
            raise ModelNotFound(model)
        return ModelRecord(model, config, rev) if res == 1 else None

    async def delete_model(self, model: str) -> bool:
        """Drop the head (everything of the model is unreachable at once) and unlink every key of it."""
        async with _guard():
            res = await self._delete_model(keys=[self.keys.model(model)], args=[self.keys.incarnations(model)])
        self._forget(model)
        return bool(res)

    async def list_params(self, model: str) -> list[ParamMeta]:
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            async with _guard():
                names = await self._names(model, inc)
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hget(self.keys.model(model), "inc")
                    for name in names:
                        pipe.hmget(self.keys.param(model, inc, name), ["shape", "dtype", "step"])
                    head, *rows = await pipe.execute()
            if head is None or _text(head) != inc:
                await self._inc(model, fresh=True)
                continue
            out = []
            for name, (shape, dtype, step) in zip(names, rows, strict=True):
                if shape is not None:  # deleted since the index was read
                    out.append(ParamMeta(name, tuple(json.loads(shape)), dtype.decode(), int(step)))
            return out
        raise _moving(model)

    async def _names(self, model: str, inc: str) -> list[str]:
        names = await self._redis.smembers(self.keys.param_index(model, inc))
        return sorted(_text(n) for n in names)

    async def read(
        self, model: str, names: list[str] | None, *, with_velocity: bool
    ) -> tuple[ModelRecord, dict[str, ParamRecord]]:
        """One round trip for the metadata and etags; a second only for what the cache lacks.

        The cache holds the states this process last wrote or read, keyed by etag: a fresh
        token per write, so a cached state whose etag is still in Redis is the current one.
        """
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            async with _guard():
                wanted = await self._names(model, inc) if names is None else names
                flat = await self._read_meta(
                    keys=[self.keys.model(model), *(self.keys.param(model, inc, n) for n in wanted)], args=[inc]
                )
            record = _model_record(model, flat[:2])
            if record is None:
                self._forget(model)
                raise ModelNotFound(model)
            if _text(flat[2]) != inc:  # deleted and created again since: read the new incarnation
                await self._inc(model, fresh=True)
                continue
            rows = [flat[i : i + 4] for i in range(3, len(flat), 4)]
            missing = [n for n, row in zip(wanted, rows, strict=True) if not row[0]]
            if missing:
                raise ParamNotFound(model, missing)
            params: dict[str, ParamRecord] = {}
            stale = []
            for name, (_, _, _, etag) in zip(wanted, rows, strict=True):
                cached = self._cache.get(model, name, etag.decode())
                if cached is not None:
                    params[name] = cached
                else:
                    stale.append(name)
            if stale:
                async with _guard():
                    await self._fetch(model, inc, stale, params)
            if with_velocity:
                return record, {name: params[name] for name in wanted}
            return record, {
                name: ParamRecord(name, params[name].value, None, params[name].step, params[name].etag)
                for name in wanted
            }
        raise _moving(model)

    async def _fetch(self, model: str, inc: str, names: list[str], into: dict[str, ParamRecord]) -> None:
        """Read whole parameter states (value and velocity) into ``into`` and the cache."""
        fields = [*_PARAM_FIELDS, "velocity"]
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self.keys.param(model, inc, name), fields)
            full_rows = await pipe.execute()
        gone = [n for n, row in zip(names, full_rows, strict=True) if row[0] is None]
        if gone:
            raise ParamNotFound(model, gone)
        for name, row in zip(names, full_rows, strict=True):
            shape, dtype = tuple(json.loads(row[0])), row[1].decode()
            velocity = None if row[5] is None else _decode(row[5], dtype, shape)
            rec = ParamRecord(name, _decode(row[4], dtype, shape), velocity, int(row[2]), row[3].decode())
            self._cache.put(model, rec)
            into[name] = rec

    async def put_params(self, model: str, values: dict[str, Array], *, only_create: bool) -> dict[str, bool]:
        names = list(values)
        etags = [new_token() for _ in names]
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            keys = [
                self.keys.model(model),
                self.keys.param_index(model, inc),
                *(self.keys.param(model, inc, n) for n in names),
            ]
            args: list[Any] = [inc, "1" if only_create else "0"]
            for name, etag in zip(names, etags, strict=True):
                v = values[name]
                args += [name, json.dumps(list(v.shape)), v.dtype.name, etag, _encode(v)]
            async with _guard():
                res = await self._put_params(keys=keys, args=args)
            code = int(res[0])
            if code == -4:
                await self._inc(model, fresh=True)
                continue
            if code == -1:
                self._forget(model)
                raise ModelNotFound(model)
            if code == -2:
                raise ParamsExist(model, [n.decode() for n in res[1:]])
            for name, etag in zip(names, etags, strict=True):
                self._cache.put(model, ParamRecord(name, np.array(values[name]), None, 0, etag))
            return {name: bool(flag) for name, flag in zip(names, res[1:], strict=True)}
        raise _moving(model)

    async def delete_param(self, model: str, name: str) -> bool:
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            keys = [self.keys.model(model), self.keys.param_index(model, inc), self.keys.param(model, inc, name)]
            async with _guard():
                res = await self._delete_param(keys=keys, args=[inc, name])
            self._cache.drop(model, name)
            if res == -4:
                await self._inc(model, fresh=True)
                continue
            if res == -1:
                self._forget(model)
                raise ModelNotFound(model)
            return bool(res)
        raise _moving(model)

    async def commit_step(
        self,
        model: str,
        expected_rev: str,
        updates: list[ParamUpdate],
        claim: Claim | None = None,
        summary: str = "",
    ) -> CommitOutcome:
        inc = await self._inc(model)
        keys = [
            self.keys.model(model),
            self.keys.idempotency(model, inc),
            self.keys.idempotency_expiry(model, inc),
            *(self.keys.param(model, inc, u.name) for u in updates),
        ]
        args: list[Any] = [inc, expected_rev]
        if claim is None:
            args += ["0", "", "", "", 0, ""]
        else:
            args += ["1", claim.key, claim.fingerprint, claim.owner, claim.ttl_ms, summary]
        for u in updates:
            if u.velocity is None:
                args += [f"{u.expected_etag}|{u.etag}|0|{u.step}", _encode(u.value), b""]
            else:
                args += [f"{u.expected_etag}|{u.etag}|1|{u.step}", _encode(u.value), _encode(u.velocity)]
        async with _guard():
            res = await self._commit_step(keys=keys, args=args)
        code = int(res[0])
        if code == -1:
            self._forget(model)
            raise ModelNotFound(model)
        if code == 1:
            for u in updates:
                self._cache.put(model, ParamRecord(u.name, u.value, u.velocity, u.step, u.etag))
        if code == 2:
            return CommitOutcome("done", _text(res[1]), _text(res[2]))
        if code == 0:
            self._incs.pop(model, None)  # maybe another incarnation: the re-read reads the head again
        return CommitOutcome({1: "applied", 0: "conflict", -2: "mismatch", -3: "in_flight"}[code])  # type: ignore[arg-type]

    async def claim(self, model: str, claim: Claim) -> ClaimState:
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            keys = [self.keys.model(model), self.keys.idempotency(model, inc), self.keys.idempotency_expiry(model, inc)]
            async with _guard():
                res = await self._claim(
                    keys=keys, args=[inc, claim.key, claim.fingerprint, claim.owner, claim.lease_ms]
                )
            status = _text(res[0])
            if status == "gone":
                await self._inc(model, fresh=True)
                continue
            if status == "done":
                return ClaimState("done", _text(res[1]), _text(res[2]))
            return ClaimState(status)  # type: ignore[arg-type]
        raise _moving(model)

    async def release(self, model: str, claim: Claim) -> None:
        inc = self._incs.get(model)
        if inc is None:
            return  # the model is gone, and its records with it
        keys = [self.keys.idempotency(model, inc), self.keys.idempotency_expiry(model, inc)]
        async with _guard():
            await self._release(keys=keys, args=[claim.key, claim.owner])

    async def contribute(
        self, model: str, step: int, worker: int, grads: dict[str, Array], ttl_ms: int
    ) -> Contribution:
        names = list(grads)
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            keys = [
                self.keys.model(model),
                self.keys.sync_step(model, inc, step),
                self.keys.sync_expiry(model, inc),
                *(self.keys.param(model, inc, n) for n in names),
            ]
            args: list[Any] = [inc, step, worker, ttl_ms, self.keys.incarnation_base(model, inc)]
            for name in names:
                args += [name, _encode(grads[name])]
            async with _guard():
                res = await self._contribute(keys=keys, args=args)
            code = int(res[0])
            if code == -4:
                await self._inc(model, fresh=True)
                continue
            if code == -1:
                self._forget(model)
                raise ModelNotFound(model)
            if code == -2:
                raise ParamNotFound(model, [names[int(res[1]) - 1]])
            if code == 0:
                return Contribution("moved", {}, {n: int(v) for n, v in zip(names, res[1:], strict=True)})
            counts = {n: int(v) for n, v in zip(names, res[2:], strict=True)}
            return Contribution("duplicate" if int(res[1]) else "added", counts, {n: step for n in names})
        raise _moving(model)

    async def _sync_fields(self, model: str, step: int) -> dict[str, bytes]:
        inc = await self._inc(model)
        async with _guard():
            raw = await self._redis.hgetall(self.keys.sync_step(model, inc, step))
        return {_text(k): v if isinstance(v, bytes) else v.encode() for k, v in raw.items()}

    async def contributions(self, model: str, step: int, names: list[str]) -> dict[str, dict[int, bytes]]:
        out: dict[str, dict[int, bytes]] = {name: {} for name in names}
        for field, value in (await self._sync_fields(model, step)).items():
            if field.startswith("g:"):
                _, worker, name = parse_sync_field(field)
                if name in out:
                    out[name][worker] = value
        return out

    async def contributors(self, model: str, step: int, names: list[str]) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {name: set() for name in names}
        for field in await self._sync_fields(model, step):
            if field.startswith("w:"):
                _, worker, name = parse_sync_field(field)
                if name in out:
                    out[name].add(worker)
        return out

    async def drop_contributions(self, model: str, step: int, names: list[str]) -> None:
        inc = await self._inc(model)
        async with _guard():
            await self._drop_contributions(keys=[self.keys.sync_step(model, inc, step)], args=names)

    async def steps(self, model: str, names: list[str]) -> dict[str, int]:
        for _ in range(_INC_TRIES):
            inc = await self._inc(model)
            async with _guard(), self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self.keys.model(model), "inc")
                for name in names:
                    pipe.hget(self.keys.param(model, inc, name), "step")
                head, *rows = await pipe.execute()
            if head is None:
                self._forget(model)
                raise ModelNotFound(model)
            if _text(head) != inc:
                await self._inc(model, fresh=True)
                continue
            missing = [n for n, v in zip(names, rows, strict=True) if v is None]
            if missing:
                raise ParamNotFound(model, missing)
            return {n: int(v) for n, v in zip(names, rows, strict=True)}
        raise _moving(model)


# A model deleted and created again between reading its head and using it: read the head again,
# a few times (each time means another delete and create in between), then give up with a 503.
_INC_TRIES = 5


def _moving(model: str) -> StoreUnavailable:
    return StoreUnavailable(f"model {model!r} keeps being deleted and created again; nothing was changed")


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _model_record(model: str, row: list[Any]) -> ModelRecord | None:
    config, rev = row
    if config is None or rev is None:
        return None
    return ModelRecord(model, json.loads(config), _text(rev))
