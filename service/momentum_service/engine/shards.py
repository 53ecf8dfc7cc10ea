"""Parameter shards: which shard a parameter belongs to, and the internal models that hold them.

A model with ``shards: n`` (n > 1) keeps its parameters in n parts. Parameter ``name`` belongs
to shard ``xxh3_64(name) % n``. Shard 0 is the model itself (its head holds the config, with
``shards``); shard ``i > 0`` is an internal model named ``<model>~<i>``, with the model's config
but for ``shards`` (``~`` cannot appear in a public model name, so no model clashes with a shard,
and each shard's Redis keys carry their own hash tag: shards spread over Redis Cluster slots too).

Each shard has its own owner, lease, log, snapshots and idempotency table, exactly like a model;
the placement (:meth:`.cluster.Cluster.preferred`) puts shard ``i`` of a model on the ``i``-th
replica of the model's rendezvous ranking, so the shards of a model land on distinct replicas
whenever there are at least n of them. This module is pure: names and arithmetic, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import xxhash

__all__ = ["SEPARATOR", "base_of", "index_of", "is_shard", "shard_name", "shard_names", "shard_of", "split"]

SEPARATOR = "~"
_SHARD = re.compile(r"^(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,127})~(?P<index>[1-9][0-9]?)$")


def shard_of(name: str, shards: int) -> int:
    """The shard of parameter ``name`` in a model of ``shards`` shards."""
    if shards <= 1:
        return 0
    return xxhash.xxh3_64_intdigest(name.encode()) % shards


def shard_name(model: str, index: int) -> str:
    """The model that holds shard ``index`` of ``model`` (shard 0 is the model itself)."""
    return model if index == 0 else f"{model}{SEPARATOR}{index}"


def shard_names(model: str, shards: int) -> list[str]:
    """Every shard's model, shard 0 (``model``) first."""
    return [shard_name(model, i) for i in range(max(1, shards))]


def is_shard(model: str) -> bool:
    """``model`` is an internal shard name ``<model>~<i>`` (i from 1 to 63)."""
    match = _SHARD.match(model)
    return match is not None and int(match.group("index")) < 64


def base_of(model: str) -> str:
    """The model a shard name belongs to (a model name is its own base)."""
    match = _SHARD.match(model)
    return match.group("model") if match is not None else model


def index_of(model: str) -> int:
    """The shard index of a shard name (0 for a model name)."""
    match = _SHARD.match(model)
    return int(match.group("index")) if match is not None else 0


def split(names: Iterable[str], shards: int) -> dict[int, list[str]]:
    """``names`` by shard (only the shards that have some), each list in the given order."""
    out: dict[int, list[str]] = {}
    for name in names:
        out.setdefault(shard_of(name, shards), []).append(name)
    return out
