"""Every Redis key the service uses, built here (and, from the same parts, in ``scripts.py``).

All keys of one model share the hash tag ``{model}``, so they live in one Redis Cluster slot and
the scripts over a model stay valid on a cluster.

A model's *head* names its current incarnation; every other key of the model but its lease
carries that incarnation, so deleting the model (dropping the head) makes all of its state
unreachable at once, and a model created again under the same name never reads anything of the
old one. The lease is the model name's, across incarnations: its fencing token only grows.

- ``<p>:{<m>}:model``                     hash: ``config`` (JSON), ``rev``, ``inc`` (incarnation),
  ``seq`` (changes made), ``snap`` (the latest snapshot's metadata, JSON), ``snapkeys``
  (``<fence>:<seq>:<n>``: the snapshot's data keys)
- ``<p>:{<m>}:lease``                     hash: ``replica``, ``url``, ``fence``, ``until`` (ms, Redis's clock)
- ``<p>:{<m>}:wait``                      string: the fence of the last owner that waited for Redis replicas
  (durability ``{"replicas": n}``: the write that ``WAIT`` waits for, on the model's primary)
- ``<p>:{<m>}:i:<inc>:log:<seq>:<k>``     string: data buffer ``k`` of log entry ``seq``
- ``<p>:{<m>}:i:<inc>:logmeta``           hash: ``seq`` -> ``<buffers> <metadata JSON>``
- ``<p>:{<m>}:i:<inc>:stage:<fence>:<seq>:<k>``  string: a buffer being written (renamed to its ``log:``
  key by the same transaction, or deleted)
- ``<p>:{<m>}:i:<inc>:snap:<fence>:<seq>:<k>``   string: data buffer ``k`` of a snapshot
- ``<p>:{<m>}:i:<inc>:idem``              hash: Idempotency-Key -> ``<fingerprint>|<expiry ms>|<summary>``
- ``<p>:{<m>}:i:<inc>:idem-exp``          sorted set: Idempotency-Key by expiry (ms), to trim the hash
- ``<p>:{<m>}:i:<inc>:points``            list: the training series' points (JSON), capped (see ``engine/series.py``)
- ``<p>:{models}:index``                  sorted set: every model's name (score 0, read by lexical range), for
  ``GET /v1/models``; written after a create and a delete, and again whenever a model is loaded
- ``<p>:{replicas}:live``                 sorted set: replica id by expiry (ms)
- ``<p>:{replicas}:urls``                 hash: replica id -> URL

**No key is ever another's.** Model names cannot hold ``{``, ``}`` or ``:``; after the model and
incarnation come fixed kind tags and numbers only. Idempotency keys are hash fields, never key
names. ``tests/test_keys.py`` checks that keys decode uniquely.
"""

from __future__ import annotations

# Suffixes after an incarnation's base ``<prefix>:{<model>}:i:<inc>:`` (shared with scripts.py).
LOG = "log:"
LOGMETA = "logmeta"
STAGE = "stage:"
SNAP = "snap:"
IDEM = "idem"
IDEM_EXPIRY = "idem-exp"
POINTS = "points"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def model(self, model: str) -> str:
        """The head: config, rev, incarnation, seq and the latest snapshot."""
        return f"{self.prefix}:{{{model}}}:model"

    def lease(self, model: str) -> str:
        return f"{self.prefix}:{{{model}}}:lease"

    def wait(self, model: str) -> str:
        return f"{self.prefix}:{{{model}}}:wait"

    def incarnations(self, model: str) -> str:
        """What every incarnation's base starts with; the incarnation and ``:`` follow."""
        return f"{self.prefix}:{{{model}}}:i:"

    def base(self, model: str, inc: str) -> str:
        return f"{self.incarnations(model)}{inc}:"

    def log(self, model: str, inc: str, seq: int, k: int) -> str:
        return f"{self.base(model, inc)}{LOG}{int(seq)}:{int(k)}"

    def logmeta(self, model: str, inc: str) -> str:
        return self.base(model, inc) + LOGMETA

    def stage(self, model: str, inc: str, fence: int, seq: int, k: int) -> str:
        return f"{self.base(model, inc)}{STAGE}{int(fence)}:{int(seq)}:{int(k)}"

    def snap(self, model: str, inc: str, fence: int, seq: int, k: int) -> str:
        return f"{self.base(model, inc)}{SNAP}{int(fence)}:{int(seq)}:{int(k)}"

    def idempotency(self, model: str, inc: str) -> str:
        return self.base(model, inc) + IDEM

    def idempotency_expiry(self, model: str, inc: str) -> str:
        return self.base(model, inc) + IDEM_EXPIRY

    def points(self, model: str, inc: str) -> str:
        return self.base(model, inc) + POINTS

    def index(self) -> str:
        """The names of the models (a model named ``models`` has ``...{models}:model``, never ``:index``)."""
        return f"{self.prefix}:{{models}}:index"

    def replicas(self) -> str:
        return f"{self.prefix}:{{replicas}}:live"

    def replica_urls(self) -> str:
        return f"{self.prefix}:{{replicas}}:urls"
