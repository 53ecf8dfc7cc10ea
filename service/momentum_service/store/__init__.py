"""Storage: one protocol, an embedded in-memory backend and a Redis backend."""

from .base import (
    Claim,
    ClaimState,
    CommitOutcome,
    Contribution,
    ModelRecord,
    ParamMeta,
    ParamRecord,
    ParamUpdate,
    Store,
    new_token,
)
from .memory import MemoryStore

__all__ = [
    "Claim",
    "ClaimState",
    "CommitOutcome",
    "Contribution",
    "MemoryStore",
    "ModelRecord",
    "ParamMeta",
    "ParamRecord",
    "ParamUpdate",
    "Store",
    "new_token",
]
