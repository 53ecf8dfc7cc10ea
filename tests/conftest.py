from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from momentum_service.store import MemoryStore, Store
from momentum_service.store.redis import RedisStore

from .helpers import RedisProcess


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """One redis-server for the session, started here on a free port."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Store]:
    """Every storage backend, so one contract suite runs on each."""
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    else:
        proc: RedisProcess = request.getfixturevalue("redis_proc")
        s = RedisStore.from_url(proc.url, prefix=redis_prefix)
    yield s
    await s.close()
