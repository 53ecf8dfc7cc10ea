"""Storage: the journal protocol, the embedded journal and the Redis journal."""

from .base import (
    Batch,
    Fenced,
    Head,
    Holder,
    Journal,
    KeyRecord,
    KeyTaken,
    Lease,
    Loaded,
    Record,
    Replica,
    new_token,
)
from .memory import MemoryJournal

__all__ = [
    "Batch",
    "Fenced",
    "Head",
    "Holder",
    "Journal",
    "KeyRecord",
    "KeyTaken",
    "Lease",
    "Loaded",
    "MemoryJournal",
    "Record",
    "Replica",
    "new_token",
]
