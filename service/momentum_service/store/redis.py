"""The Redis store: state lives in Redis, shared by every server process that uses it.

Writes are Lua scripts from :mod:`.scripts` (atomic, all-or-nothing) and one explicit
WATCH/MULTI transaction (deleting a model, whose parameter keys are only known after
reading its index). Reads are pipelined into one round trip. Any Redis failure becomes
:class:`~momentum_service.errors.StoreUnavailable` (HTTP 503).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, WatchError

from ..errors import ModelNotFound, ParamNotFound, ParamsExist, StoreUnavailable
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
from .keys import Keys

# Stored little-endian whatever the host; decoded to native order (a no-op on x86 and ARM).
_DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_PARAM_FIELDS = ("shape", "dtype", "step", "etag", "value")


@asynccontextmanager
async def _guard() -> AsyncIterator[None]:
    try:
        yield
    except RedisError as exc:
        if isinstance(exc, WatchError):
            raise
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
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
        return rec.value.nbytes + (0 if rec.velocity is None else rec.velocity.nbytes)

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
        self._put_model = client.register_script(scripts.PUT_MODEL)
        self._replace_config = client.register_script(scripts.REPLACE_CONFIG)
        self._put_params = client.register_script(scripts.PUT_PARAMS)
        self._commit_step = client.register_script(scripts.COMMIT_STEP)
        self._delete_param = client.register_script(scripts.DELETE_PARAM)
        self._claim = client.register_script(scripts.CLAIM)
        self._release = client.register_script(scripts.RELEASE)
        self._contribute = client.register_script(scripts.CONTRIBUTE)
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

    async def put_model(self, model: str, config: dict[str, Any]) -> tuple[ModelRecord, bool]:
        rev = new_token()
        async with _guard():
            created = await self._put_model(keys=[self.keys.model(model)], args=[json.dumps(config), rev])
        return ModelRecord(model, config, rev), created == 1

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
        model_key, index_key = self.keys.model(model), self.keys.param_index(model)
        async with _guard(), self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(model_key, index_key)
                    existed = bool(await pipe.exists(model_key))
                    names = await pipe.smembers(index_key)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.delete(model_key, index_key, *(self.keys.param(model, _text(n)) for n in names))
                    await pipe.execute()
                    self._cache.drop(model)
                    return existed
                except WatchError:
                    continue

    async def list_params(self, model: str) -> list[ParamMeta]:
        async with _guard():
            names = await self._names(model)
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hmget(self.keys.param(model, name), ["shape", "dtype", "step"])
                rows = await pipe.execute()
        out = []
        for name, (shape, dtype, step) in zip(names, rows, strict=True):
            if shape is not None:  # deleted since the index was read
                out.append(ParamMeta(name, tuple(json.loads(shape)), dtype.decode(), int(step)))
        return out

    async def _names(self, model: str) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.model(model))
            pipe.smembers(self.keys.param_index(model))
            exists, names = await pipe.execute()
        if not exists:
            raise ModelNotFound(model)
        return sorted(_text(n) for n in names)

    async def read(
        self, model: str, names: list[str] | None, *, with_velocity: bool
    ) -> tuple[ModelRecord, dict[str, ParamRecord]]:
        """One round trip for the metadata and etags; a second only for what the cache lacks.

        The cache holds the states this process last wrote or read, keyed by etag: a fresh
        token per write, so a cached state whose etag is still in Redis is the current one.
        """
        async with _guard():
            wanted = await self._names(model) if names is None else names
            flat = await self._read_meta(keys=[self.keys.model(model), *(self.keys.param(model, n) for n in wanted)])
            model_row = flat[:2]
            rows = [flat[i : i + 4] for i in range(2, len(flat), 4)]
            record = _model_record(model, model_row)
            if record is None:
                raise ModelNotFound(model)
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
                fields = [*_PARAM_FIELDS, "velocity"]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in stale:
                        pipe.hmget(self.keys.param(model, name), fields)
                    full_rows = await pipe.execute()
                gone = [n for n, row in zip(stale, full_rows, strict=True) if row[0] is None]
                if gone:
                    raise ParamNotFound(model, gone)
                for name, row in zip(stale, full_rows, strict=True):
                    shape, dtype = tuple(json.loads(row[0])), row[1].decode()
                    velocity = None if row[5] is None else _decode(row[5], dtype, shape)
                    rec = ParamRecord(name, _decode(row[4], dtype, shape), velocity, int(row[2]), row[3].decode())
                    self._cache.put(model, rec)
                    params[name] = rec
        if with_velocity:
            return record, {name: params[name] for name in wanted}
        return record, {
            name: ParamRecord(name, params[name].value, None, params[name].step, params[name].etag) for name in wanted
        }

    async def put_params(self, model: str, values: dict[str, Array], *, only_create: bool) -> dict[str, bool]:
        names = list(values)
        keys = [self.keys.model(model), self.keys.param_index(model), *(self.keys.param(model, n) for n in names)]
        args: list[Any] = ["1" if only_create else "0"]
        etags = [new_token() for _ in names]
        for name, etag in zip(names, etags, strict=True):
            v = values[name]
            args += [name, json.dumps(list(v.shape)), v.dtype.name, etag, _encode(v)]
        async with _guard():
            res = await self._put_params(keys=keys, args=args)
        if res[0] == -1:
            raise ModelNotFound(model)
        if res[0] == -2:
            raise ParamsExist(model, [n.decode() for n in res[1:]])
        for name, etag in zip(names, etags, strict=True):
            self._cache.put(model, ParamRecord(name, np.array(values[name]), None, 0, etag))
        return {name: bool(flag) for name, flag in zip(names, res[1:], strict=True)}

    async def delete_param(self, model: str, name: str) -> bool:
        keys = [self.keys.model(model), self.keys.param_index(model), self.keys.param(model, name)]
        async with _guard():
            res = await self._delete_param(keys=keys, args=[name])
        self._cache.drop(model, name)
        if res == -1:
            raise ModelNotFound(model)
        return bool(res)

    async def commit_step(
        self,
        model: str,
        expected_rev: str,
        updates: list[ParamUpdate],
        claim: Claim | None = None,
        summary: str = "",
    ) -> CommitOutcome:
        idem_key = self.keys.idempotency(model, claim.key if claim else "-")
        keys = [self.keys.model(model), idem_key, *(self.keys.param(model, u.name) for u in updates)]
        args: list[Any] = [expected_rev]
        if claim is None:
            args += ["0", "", "", 0, ""]
        else:
            args += ["1", claim.fingerprint, claim.owner, claim.ttl_ms, summary]
        for u in updates:
            if u.velocity is None:
                args += [f"{u.expected_etag}|{u.etag}|0|{u.step}", _encode(u.value), b""]
            else:
                args += [f"{u.expected_etag}|{u.etag}|1|{u.step}", _encode(u.value), _encode(u.velocity)]
        async with _guard():
            res = await self._commit_step(keys=keys, args=args)
        code = int(res[0])
        if code == -1:
            raise ModelNotFound(model)
        if code == 1:
            for u in updates:
                self._cache.put(model, ParamRecord(u.name, u.value, u.velocity, u.step, u.etag))
        if code == 2:
            return CommitOutcome("done", _text(res[1]), _text(res[2]))
        return CommitOutcome({1: "applied", 0: "conflict", -2: "mismatch", -3: "in_flight"}[code])  # type: ignore[arg-type]

    async def claim(self, model: str, claim: Claim) -> ClaimState:
        async with _guard():
            res = await self._claim(
                keys=[self.keys.idempotency(model, claim.key)], args=[claim.fingerprint, claim.owner, claim.lease_ms]
            )
        status = _text(res[0])
        if status == "done":
            return ClaimState("done", _text(res[1]), _text(res[2]))
        return ClaimState(status)  # type: ignore[arg-type]

    async def release(self, model: str, claim: Claim) -> None:
        async with _guard():
            await self._release(keys=[self.keys.idempotency(model, claim.key)], args=[claim.owner])

    async def contribute(
        self, model: str, step: int, worker: int, grads: dict[str, Array], ttl_ms: int
    ) -> Contribution:
        names = list(grads)
        keys = [self.keys.model(model)]
        for name in names:
            keys += [
                self.keys.param(model, name),
                self.keys.sync_grads(model, step, name),
                self.keys.sync_workers(model, step, name),
            ]
        args: list[Any] = [step, worker, ttl_ms, *(_encode(grads[n]) for n in names)]
        async with _guard():
            res = await self._contribute(keys=keys, args=args)
        code = int(res[0])
        if code == -1:
            raise ModelNotFound(model)
        if code == -2:
            raise ParamNotFound(model, [names[int(res[1]) - 1]])
        if code == 0:
            return Contribution("moved", {}, {n: int(v) for n, v in zip(names, res[1:], strict=True)})
        counts = {n: int(v) for n, v in zip(names, res[2:], strict=True)}
        return Contribution("duplicate" if int(res[1]) else "added", counts, {n: step for n in names})

    async def contributions(self, model: str, step: int, names: list[str]) -> dict[str, dict[int, bytes]]:
        async with _guard(), self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.sync_grads(model, step, name))
            rows = await pipe.execute()
        return {name: {int(w): g for w, g in row.items()} for name, row in zip(names, rows, strict=True)}

    async def contributors(self, model: str, step: int, names: list[str]) -> dict[str, set[int]]:
        async with _guard(), self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.smembers(self.keys.sync_workers(model, step, name))
            rows = await pipe.execute()
        return {name: {int(w) for w in row} for name, row in zip(names, rows, strict=True)}

    async def drop_contributions(self, model: str, step: int, names: list[str]) -> None:
        async with _guard():
            await self._redis.delete(*(self.keys.sync_grads(model, step, n) for n in names))

    async def steps(self, model: str, names: list[str]) -> dict[str, int]:
        async with _guard(), self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(self.keys.param(model, name), "step")
            rows = await pipe.execute()
        missing = [n for n, v in zip(names, rows, strict=True) if v is None]
        if missing:
            raise ParamNotFound(model, missing)
        return {n: int(v) for n, v in zip(names, rows, strict=True)}


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _model_record(model: str, row: list[Any]) -> ModelRecord | None:
    config, rev = row
    if config is None or rev is None:
        return None
    return ModelRecord(model, json.loads(config), _text(rev))
