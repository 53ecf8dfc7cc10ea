"""The Redis journal: every model's durable record, shared by every server process that uses it.

Writes are the Lua scripts of :mod:`.scripts`, each behind one typed method here (atomic,
fenced, all-or-nothing, refused before they run when Redis is full). A batch is one ``MULTI``:
its data buffers sent by ``SET`` as they are (redis-py sends a ``memoryview`` without copying
it), then the ``COMMIT`` script. Redis errors become domain errors by what a client should do
about them (see :func:`_guard`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from ..errors import Fenced, KeyTaken, StoreError, StoreFull, StoreUnavailable
from . import scripts
from .base import Batch, Buffer, Head, Holder, KeyRecord, Lease, Loaded, Record, Replica
from .keys import Keys

log = logging.getLogger("momentum_service")

INLINE_BYTES = 256 << 10
"""A batch whose buffers total at most this many bytes passes them to ``COMMIT`` as arguments (one command);
a larger one sends them by ``SET`` in a transaction with the script, which renames them into the log
(Redis copies a script's arguments once more, which costs more than the extra commands past this size)."""


class JournalCorrupt(StoreError):
    """What Redis holds of a model is not a journal this service wrote (a missing entry, say)."""


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
    except (
        RedisConnectionError,
        RedisTimeoutError,
        ReadOnlyError,
        ClusterDownError,
        TryAgainError,
        MasterDownError,
        SlotNotCoveredError,
        ClusterError,  # "TTL exhausted": redirected (ASK, MOVED) too many times while a slot moves
    ) as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
    except ResponseError as exc:
        text = str(exc)
        if text.startswith(("BUSY", "LOADING", "MASTERDOWN")):
            raise StoreUnavailable(f"redis: {exc}") from exc
        if text.startswith("OOM") or "OOM command not allowed" in text:
            raise StoreFull(f"Redis is at its memory limit (maxmemory); nothing was changed: {exc}") from exc
        raise StoreError(f"redis answered an error: {type(exc).__name__}: {exc}") from exc
    except RedisClusterException as exc:
        # The cluster client's own failures: no node answers or the slot map cannot be read (Redis is down),
        # or a command it refuses to route (a bug here, not an outage).
        if "cannot be connected" in str(exc) or "nodes" in str(exc).lower():
            raise StoreUnavailable(f"redis cluster: {type(exc).__name__}: {exc}") from exc
        raise StoreError(f"redis cluster: {type(exc).__name__}: {exc}") from exc
    except RedisError as exc:
        raise StoreError(f"redis: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
    except (RuntimeError, AttributeError, TypeError) as exc:
        # redis-py's asyncio cluster client may use a connection that another task is closing while it reads
        # the slot map again (after a node failed or a slot moved): uvloop's "unable to perform operation on
        # <TCPTransport closed=True>", or "'NoneType' object has no attribute 'writelines'" (redis-py issue
        # 3546). Only such errors raised inside redis-py's own connection code are an outage; others are bugs.
        if not _raised_in_redis_connection(exc):
            raise
        raise StoreUnavailable(f"redis: a connection closed under a command ({type(exc).__name__}: {exc})") from exc


def _raised_in_redis_connection(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by redis-py's connection code (or the event loop's transport under it)."""
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(f.endswith(("redis/asyncio/connection.py", "asyncio/streams.py")) for f in frames[-4:])


def _noscript(result: Any) -> bool:
    return isinstance(result, NoScriptError) or (isinstance(result, Exception) and "NOSCRIPT" in str(result))


def _host_port(seed: str) -> tuple[str, int]:
    host, _, port = seed.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a Redis Cluster seed node must be host:port, got {seed!r}")
    return host.strip("[]"), int(port)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class RedisJournal:
    kind = "redis"
    durable = True
    replicated = True

    def __init__(
        self, client: aioredis.Redis | RedisCluster, prefix: str = "momentum", *, wait_timeout_ms: int = 1000
    ) -> None:
        # A RedisCluster client works as a Redis one here: every key of a model shares its hash tag, so each
        # script, pipeline and transaction over a model runs on the one node that serves its slot.
        self._redis: Any = client
        self.cluster = isinstance(client, RedisCluster)
        self.wait_timeout_ms = wait_timeout_ms
        self.keys = Keys(prefix)
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in ("HEARTBEAT", "ACQUIRE", "RENEW", "RELEASE", "HOLDER", "CREATE", "DELETE", "LOOKUP")
        }
        self._commit = client.register_script(scripts.COMMIT)
        self._commit_small = client.register_script(scripts.COMMIT_SMALL)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "momentum",
        timeout: float = 2.0,
        cluster: bool = False,
        seeds: Sequence[str] = (),
    ) -> RedisJournal:
        """A journal on a new connection pool.

        redis-py's default policy retries a failed command 10 times with growing pauses, which
        turns an unresponsive Redis into a request that hangs for a minute. Here a command is
        tried at most 3 times, 25-100 ms apart: a request gets its 503 within about
        ``3 * timeout + 0.2`` seconds. Re-sent writes are harmless (a batch re-sent after its first
        attempt landed finds the head at its own seq). No periodic health check: its PING runs under
        the same retry policy *inside* each attempt, so on a new or idle connection a frozen Redis
        took up to 9 timeouts; a stale connection fails its command instead, which is retried on a
        fresh one.

        With ``cluster``, ``url`` names one node of a Redis Cluster (its credentials and TLS apply to
        every node) and ``seeds`` more ``host:port`` nodes to learn the cluster's map from (any one
        that answers will do). redis-py follows MOVED and ASK redirections itself, and after a
        connection failure reads the slot map again, trying each command at most 3 times: while a
        failed primary is replaced (the cluster's node timeout plus an election), the commands on
        its slots get 503s, the others go on.
        """
        retry = Retry(ExponentialBackoff(cap=0.1, base=0.025), retries=2)
        wait_ms = max(1, int(timeout * 1000 / 2))  # WAIT must answer well within the socket timeout
        if cluster:
            nodes = [ClusterNode(*_host_port(s)) for s in seeds]
            client: Any = RedisCluster.from_url(
                url,
                startup_nodes=nodes or None,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                health_check_interval=0,
                retry=retry,
                require_full_coverage=False,
            )
        else:
            client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                health_check_interval=0,
                retry=retry,
            )
        return cls(client, prefix, wait_timeout_ms=wait_ms)

    async def ping(self) -> None:
        async with _guard():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with _guard():
            return await self._scripts[name](keys=list(keys), args=list(args))

    # Replicas and leases.

    async def heartbeat(self, replica: Replica, ttl_ms: int) -> list[Replica]:
        flat = await self._run(
            "HEARTBEAT", [self.keys.replicas(), self.keys.replica_urls()], [replica.id, replica.url, ttl_ms]
        )
        return [Replica(_text(flat[i]), _text(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def acquire(self, model: str, replica: Replica, lease_ms: int) -> Lease | Holder:
        res = await self._run("ACQUIRE", [self.keys.lease(model)], [replica.id, replica.url, lease_ms])
        if int(res[0]) == 1:
            return Lease(model, int(_text(res[1])), replica.id)
        return Holder(_text(res[1]), _text(res[2]), int(_text(res[3])), int(res[4]))

    async def renew(self, leases: Sequence[Lease], lease_ms: int) -> list[bool]:
        script = self._scripts["RENEW"]
        for attempt in range(2):
            async with _guard(), self._redis.pipeline(transaction=False) as pipe:
                for lease in leases:
                    pipe.execute_command(
                        "EVALSHA", script.sha, 1, self.keys.lease(lease.model), lease.replica, lease.fence, lease_ms
                    )
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(_noscript(r) for r in results):
                await self._load(scripts.RENEW)  # a restarted (or newly promoted) node has an empty script cache
                continue
            for r in results:
                if isinstance(r, Exception):
                    async with _guard():
                        raise r
            return [int(r) == 1 for r in results]
        raise AssertionError("unreachable")

    async def _load(self, script: str) -> None:
        """Load a script into every primary's cache (a cluster client sends SCRIPT LOAD to all of them)."""
        async with _guard():
            await self._redis.script_load(script)

    async def release(self, lease: Lease) -> None:
        await self._run("RELEASE", [self.keys.lease(lease.model)], [lease.replica, lease.fence])

    async def holder(self, model: str) -> Holder | None:
        res = await self._run("HOLDER", [self.keys.lease(model)], [])
        if not res:
            return None
        return Holder(_text(res[0]), _text(res[1]), int(_text(res[2])), int(res[3]))

    # A model's record.

    async def model_names(self, after: str, limit: int) -> list[str]:
        # The index of model names (a sorted set, read by lexical range: no SCAN, which the ACL forbids).
        low = f"({after}" if after else "-"
        async with _guard():
            raw = await self._redis.zrange(self.keys.index(), low, "+", bylex=True, offset=0, num=limit)
        return [_text(r) for r in raw]

    async def load(self, model: str) -> Loaded | None:
        k = self.keys
        async with _guard():
            raw = await self._redis.hgetall(k.model(model))
        if not raw:
            return None
        # The index entry, again: a crash between a create and its index write is repaired. Best effort: a
        # full Redis refuses the write, and a model must still load (to be read, or deleted to free memory).
        with contextlib.suppress(StoreFull, StoreError):
            async with _guard():
                await self._redis.zadd(self.keys.index(), {model: 0})
        head_fields = {_text(f): v for f, v in raw.items()}
        inc = _text(head_fields["inc"])
        head = Head(json.loads(head_fields["config"]), _text(head_fields["rev"]), inc, int(head_fields["seq"]))
        snapshot, first = None, 1
        async with _guard(), self._redis.pipeline(transaction=False) as pipe:
            spec = head_fields.get("snapkeys")
            nsnap = 0
            if spec is not None:
                fence, seq, nsnap = (int(x) for x in _text(spec).split(":"))
                for j in range(nsnap):
                    pipe.get(k.snap(model, inc, fence, seq, j))
                first = seq + 1
            pipe.hgetall(k.logmeta(model, inc))
            got = await pipe.execute()
        if spec is not None:
            data = got[:nsnap]
            if any(d is None for d in data):
                raise JournalCorrupt(f"model {model!r}: a buffer of its snapshot is missing")
            snapshot = Record(json.loads(head_fields["snap"]), tuple(data))
        metas = {int(_text(s)): _text(m) for s, m in got[-1].items()}
        log: list[Record] = []
        wanted = []
        for seq in range(first, head.seq + 1):
            text = metas.get(seq)
            if text is None:
                raise JournalCorrupt(f"model {model!r}: log entry {seq} is missing")
            count, meta = text.split(" ", 1)
            log.append(Record(json.loads(meta)))
            wanted.append((seq, int(count)))
        if any(n for _, n in wanted):
            async with _guard(), self._redis.pipeline(transaction=False) as pipe:
                for seq, n in wanted:
                    for j in range(n):
                        pipe.get(k.log(model, inc, seq, j))
                buffers: list[Any] = await pipe.execute()
            at = 0
            for i, (seq, n) in enumerate(wanted):
                parts: tuple[Buffer, ...] = tuple(buffers[at : at + n])
                at += n
                if any(d is None for d in parts):
                    raise JournalCorrupt(f"model {model!r}: a buffer of log entry {seq} is missing")
                log[i] = Record(log[i].meta, parts)
        return Loaded(head, snapshot, log)

    async def create(self, lease: Lease, model: str, config: dict[str, Any], rev: str, inc: str) -> None:
        res = await self._run(
            "CREATE", [self.keys.lease(model), self.keys.model(model)], [lease.fence, json.dumps(config), rev, inc]
        )
        if int(res) == -1:
            raise Fenced(f"this server's lease on model {model!r} was taken over; nothing was written")
        if int(res) == 0:
            raise Fenced(f"model {model!r} was created by another server meanwhile; nothing was written")
        await self._index(model, add=True)

    async def commit(self, lease: Lease, model: str, batch: Batch) -> None:
        k, inc = self.keys, batch.inc
        buffers: list[tuple[int, int, Any]] = []  # (seq, index, buffer) of every entry's data
        entries: list[list[Any]] = []
        for i, record in enumerate(batch.entries):
            seq = batch.base_seq + 1 + i
            buffers += [(seq, j, buf) for j, buf in enumerate(record.data)]
            entries.append([str(seq), len(record.data), orjson.dumps(record.meta).decode()])
        snap = batch.snapshot
        inline = snap is None and sum(memoryview(b).nbytes for _, _, b in buffers) <= INLINE_BYTES
        staged: list[tuple[str, Any]] = []
        data_keys: list[str] = []
        for seq, j, buf in buffers:
            if inline:
                data_keys.append(k.log(model, inc, seq, j))
            else:
                stage = k.stage(model, inc, lease.fence, seq, j)
                staged.append((stage, buf))
                data_keys += [stage, k.log(model, inc, seq, j)]
        snap_keys: list[str] = []
        if snap is not None:
            snap_keys = [k.snap(model, inc, lease.fence, batch.seq, j) for j in range(len(snap.data))]
            staged += list(zip(snap_keys, snap.data, strict=True))
        keys = [
            k.lease(model),
            k.model(model),
            k.logmeta(model, inc),
            k.idempotency(model, inc),
            k.idempotency_expiry(model, inc),
            *data_keys,
            *snap_keys,
        ]
        config, rev = batch.config if batch.config is not None else (None, "")
        header = orjson.dumps(
            {
                "fence": str(lease.fence),
                "inc": inc,
                "base": str(batch.base_seq),
                "seq": str(batch.seq),
                "ttl": batch.key_ttl_ms,
                "inline": inline,
                "entries": entries,
                "keys": [[r.key, r.fingerprint, r.summary] for r in batch.keys],
                "snap": orjson.dumps(snap.meta).decode() if snap is not None else None,
                "snapkeys": f"{lease.fence}:{batch.seq}:{len(snap_keys)}" if snap is not None else "",
                "config": json.dumps(config) if config is not None else None,
                "rev": rev,
            }
        )
        if not buffers and snap is None:  # no data: the script alone (outside MULTI, so that a full Redis takes it)
            async with _guard():
                outcome = await self._commit_small(keys=keys, args=[header])
        elif inline:  # small buffers: passed to the script itself, one command instead of a transaction
            async with _guard():
                outcome = await self._commit(keys=keys, args=[header, *(buf for _, _, buf in buffers)])
        else:
            outcome = await self._transaction(staged, keys, [header])
        code = int(outcome[0])
        if code == 1 or (code == -3 and int(_text(outcome[1])) == batch.seq):
            # (-3: an earlier attempt of this very batch landed, and its answer was lost.)
            if batch.replicas:
                await self.wait_replicas(lease, model, batch.replicas)
            return
        if code == -4:
            fp, _, summary = _text(outcome[2]).split("|", 2)
            raise KeyTaken(_text(outcome[1]), fp, summary)
        raise Fenced(f"model {model!r} is no longer this server's to write (code {code}); nothing was written")

    async def wait_replicas(self, lease: Lease, model: str, replicas: int) -> None:
        """Return once ``replicas`` replicas of the primary serving ``model`` have everything it wrote so far.

        ``WAIT`` waits for the writes of *its own connection*: a pipeline sends a small write on the
        model's slot (its ``wait`` key, the fence) and ``WAIT`` on one connection to that primary. The
        replication stream is in order, so the batch written before is on the replicas too.
        Fewer replicas within the timeout: :class:`StoreUnavailable` (the batch is on the primary and
        may or may not survive its failover; the client retries with the same key)."""
        key = self.keys.wait(model)
        async with _guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(key, str(lease.fence))
            if self.cluster:
                node = self._redis.get_node_from_key(key)
                pipe.execute_command("WAIT", replicas, self.wait_timeout_ms, target_nodes=node)
            else:
                pipe.execute_command("WAIT", replicas, self.wait_timeout_ms)
            got = int((await pipe.execute())[-1])
            if self.cluster and self._redis.get_node_from_key(key) is not node:
                got = 0  # the slot moved meanwhile: WAIT ran on the old primary, and says nothing
        if got < replicas:
            raise StoreUnavailable(
                f"model {model!r}: the change is in Redis, but only {got} of the {replicas} replicas it must reach "
                f"confirmed it within {self.wait_timeout_ms} ms"
            )

    async def _transaction(self, staged: list[tuple[str, Any]], keys: list[str], args: list[Any]) -> Any:
        """``SET`` each staged buffer, then ``COMMIT``, in one ``MULTI``; the script's answer."""
        for attempt in range(2):
            async with _guard(), self._redis.pipeline(transaction=True) as pipe:
                for name, buf in staged:
                    pipe.set(name, buf)
                pipe.execute_command("EVALSHA", self._commit.sha, len(keys), *keys, *args)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except NoScriptError:
                    results = [NoScriptError("NOSCRIPT")]
            outcome = results[-1]
            if attempt == 0 and (isinstance(outcome, NoScriptError) or "NOSCRIPT" in str(outcome)):
                # Redis restarted, and its script cache is empty: load the script and try again.
                async with _guard():
                    await self._redis.unlink(*(name for name, _ in staged))
                    await self._redis.script_load(scripts.COMMIT)
                continue
            if isinstance(outcome, Exception):
                async with _guard():
                    raise outcome
            return outcome
        raise AssertionError("unreachable")

    async def delete(self, lease: Lease, model: str) -> None:
        res = await self._run(
            "DELETE", [self.keys.lease(model), self.keys.model(model)], [lease.fence, self.keys.incarnations(model)]
        )
        if int(res) == -1:
            raise Fenced(f"this server's lease on model {model!r} was taken over; nothing was deleted")
        await self._index(model, add=False)

    async def _index(self, model: str, *, add: bool) -> None:
        """The model's name in (or out of) the index of GET /v1/models: another slot than the model's, so
        not in its script. Best effort: the model is created or deleted already; a name missing is added
        again when the model is next loaded, and a name left over is skipped by the list."""
        try:
            async with _guard():
                if add:
                    await self._redis.zadd(self.keys.index(), {model: 0})
                else:
                    await self._redis.zrem(self.keys.index(), model)
        except (StoreUnavailable, StoreFull, StoreError) as exc:
            log.warning("model %r: the index of model names could not be updated (%s)", model, exc)

    async def append_points(self, model: str, inc: str, points: Sequence[bytes], cap: int) -> None:
        key = self.keys.points(model, inc)
        async with _guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.rpush(key, *points)
            pipe.ltrim(key, -cap, -1)
            await pipe.execute()

    async def load_points(self, model: str, inc: str, cap: int) -> list[bytes]:
        async with _guard():
            raw = await self._redis.lrange(self.keys.points(model, inc), -cap, -1)
        return [r if isinstance(r, bytes) else str(r).encode() for r in raw]

    async def lookup(self, model: str, inc: str, key: str) -> KeyRecord | None:
        raw = await self._run("LOOKUP", [self.keys.model(model), self.keys.idempotency(model, inc)], [inc, key])
        if not raw:
            return None
        fp, _, summary = _text(raw).split("|", 2)
        return KeyRecord(key, fp, summary)
