from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from momentum_service.store import Journal, MemoryJournal
from momentum_service.store.redis import RedisJournal

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
async def store(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Journal]:
    """Every storage backend, so one contract suite runs on each."""
    s: Journal
    if request.param == "memory":
        s = MemoryJournal()
    else:
        proc: RedisProcess = request.getfixturevalue("redis_proc")
        s = RedisJournal.from_url(proc.url, prefix=redis_prefix)
    yield s
    await s.close()
