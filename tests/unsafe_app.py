"""A deliberately broken server for the concurrency test's negative control.

Its store commits a step whatever happened since the read (last writer wins), and waits
a millisecond between reading and writing, as a slow network would. Served by uvicorn
from the tests only; nothing in the package can run this way.
"""

from __future__ import annotations

import asyncio
import os

from momentum_service.api import create_app
from momentum_service.settings import Settings
from momentum_service.store import Claim, CommitOutcome, ModelRecord, ParamRecord, ParamUpdate
from momentum_service.store.redis import RedisStore


class LastWriterWinsStore(RedisStore):
    async def read(
        self, model: str, names: list[str] | None, *, with_velocity: bool
    ) -> tuple[ModelRecord, dict[str, ParamRecord]]:
        result = await super().read(model, names, with_velocity=with_velocity)
        await asyncio.sleep(0.001)
        return result

    async def commit_step(
        self,
        model: str,
        expected_rev: str,
        updates: list[ParamUpdate],
        claim: Claim | None = None,
        summary: str = "",
    ) -> CommitOutcome:
        # Pretend every record is still the one we read: the compare-and-set is switched off.
        _, current = await super().read(model, [u.name for u in updates], with_velocity=False)
        forced = [ParamUpdate(u.name, current[u.name].etag, u.value, u.velocity, u.step, u.etag) for u in updates]
        record = await self.get_model(model)
        assert record is not None
        return await super().commit_step(model, record.rev, forced, claim, summary)


settings = Settings(redis_url=os.environ["MOMENTUM_REDIS_URL"])
app = create_app(settings, store=LastWriterWinsStore.from_url(os.environ["MOMENTUM_REDIS_URL"]))
