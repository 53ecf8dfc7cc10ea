from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from momentum_service.store import Journal, MemoryJournal
from momentum_service.store.redis import RedisJournal

from .helpers import RedisProcess
from .redis_cluster import RedisCluster


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One redis-server for the session, started here on a free port."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 6-node Redis Cluster (3 primaries, 3 replicas) for the session, started here on free ports."""
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()


def cluster_journal(cluster: RedisCluster, prefix: str) -> RedisJournal:
    return RedisJournal.from_url(cluster.url, prefix=prefix, cluster=True, seeds=cluster.seeds.split(","))


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Journal]:
    """Every storage backend, so one contract suite runs on each (a Redis Cluster being one)."""
    s: Journal
    if request.param == "memory":
        s = MemoryJournal()
    elif request.param == "cluster":
        s = cluster_journal(request.getfixturevalue("redis_cluster"), redis_prefix)
    else:
        proc: RedisProcess = request.getfixturevalue("redis_proc")
        s = RedisJournal.from_url(proc.url, prefix=redis_prefix)
    yield s
    await s.close()
