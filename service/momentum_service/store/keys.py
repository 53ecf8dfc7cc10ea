"""Every Redis key the service uses, built here (and, from the same parts, in ``scripts.py``).

All keys of one model share the hash tag ``{model}``, so they live in one Redis Cluster
slot and multi-key scripts over a model stay valid on a cluster.

A model's *head* names its current incarnation; every other key of the model carries that
incarnation, so deleting the model (dropping the head) makes all of its state unreachable at
once, and a model created again under the same name never reads anything of the old one.

- ``<prefix>:{<model>}:model``               hash: ``config`` (JSON), ``rev`` (token), ``inc`` (incarnation)
- ``<prefix>:{<model>}:i:<inc>:params``      set of parameter names
- ``<prefix>:{<model>}:i:<inc>:p:<name>``    hash: ``shape`` (JSON), ``dtype``, ``step``, ``etag``,
  ``value`` (little-endian raw bytes), ``velocity`` (same; absent before the first momentum update)
- ``<prefix>:{<model>}:i:<inc>:idem``        hash: Idempotency-Key -> its record (see ``scripts.py``)
- ``<prefix>:{<model>}:i:<inc>:idem-exp``    sorted set: Idempotency-Key by expiry (ms), to trim the hash
- ``<prefix>:{<model>}:i:<inc>:sync:<step>`` hash: a sync step's contributions (``g:<worker>:<name>``:
  gradient bytes; ``w:<worker>:<name>``: contributed; ``n:<name>``: distinct workers)
- ``<prefix>:{<model>}:i:<inc>:sync-exp``    sorted set: sync steps by expiry (ms)

**No key is ever another's.** Parameter names and idempotency keys may contain ``:`` (``w``
and ``w:who`` are both valid names), so a name is only ever the *last* component of a key or
field, after a fixed kind tag and fixed-format numbers: a key decodes uniquely into (model,
incarnation, kind, numbers, name). ``tests/test_keys.py`` checks this for adversarial names.

The Lua scripts that delete a model or trim expired sync steps build keys from the same
parts (``incarnation_base`` plus the suffixes below), so the layout is defined here only.
"""

from __future__ import annotations

# Suffixes after an incarnation's base ``<prefix>:{<model>}:i:<inc>:`` (shared with scripts.py).
PARAMS = "params"
PARAM = "p:"
IDEM = "idem"
IDEM_EXPIRY = "idem-exp"
SYNC = "sync:"
SYNC_EXPIRY = "sync-exp"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def model(self, model: str) -> str:
        """The head: config, rev and the current incarnation."""
        return f"{self.prefix}:{{{model}}}:model"

    def incarnations(self, model: str) -> str:
        """What every incarnation's base starts with; the incarnation and ``:`` follow."""
        return f"{self.prefix}:{{{model}}}:i:"

    def incarnation_base(self, model: str, inc: str) -> str:
        return f"{self.incarnations(model)}{inc}:"

    def param_index(self, model: str, inc: str) -> str:
        return self.incarnation_base(model, inc) + PARAMS

    def param(self, model: str, inc: str, name: str) -> str:
        return self.incarnation_base(model, inc) + PARAM + name

    def idempotency(self, model: str, inc: str) -> str:
        return self.incarnation_base(model, inc) + IDEM

    def idempotency_expiry(self, model: str, inc: str) -> str:
        return self.incarnation_base(model, inc) + IDEM_EXPIRY

    def sync_step(self, model: str, inc: str, step: int) -> str:
        return self.incarnation_base(model, inc) + f"{SYNC}{int(step)}"

    def sync_expiry(self, model: str, inc: str) -> str:
        return self.incarnation_base(model, inc) + SYNC_EXPIRY


# Fields of a sync step's hash: the name last, after the worker id, so fields are unambiguous.
def sync_grad_field(worker: int, name: str) -> str:
    return f"g:{int(worker)}:{name}"


def sync_who_field(worker: int, name: str) -> str:
    return f"w:{int(worker)}:{name}"


def sync_count_field(name: str) -> str:
    return f"n:{name}"


def parse_sync_field(field: str) -> tuple[str, int, str]:
    """``(kind, worker, name)`` of a ``g:`` or ``w:`` field (the inverse of the two builders above)."""
    kind, worker, name = field.split(":", 2)
    return kind, int(worker), name
