"""Storage: one protocol, an embedded in-memory backend and a Redis backend."""

from .base import ModelRecord, ParamMeta, ParamRecord, ParamUpdate, Store, new_token
from .memory import MemoryStore

__all__ = ["MemoryStore", "ModelRecord", "ParamMeta", "ParamRecord", "ParamUpdate", "Store", "new_token"]
