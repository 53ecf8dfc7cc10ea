"""Every Redis key the service uses, built here and nowhere else.

All keys of one model share the hash tag ``{model}``, so they live in one Redis Cluster
slot and multi-key scripts and transactions over a model stay valid on a cluster.

- ``<prefix>:{<model>}:model``        hash: ``config`` (JSON), ``rev`` (token)
- ``<prefix>:{<model>}:params``       set of parameter names
- ``<prefix>:{<model>}:param:<name>`` hash: ``shape`` (JSON), ``dtype``, ``step``, ``etag``,
  ``value`` (little-endian raw bytes), ``velocity`` (same; absent before the first momentum update)
- ``<prefix>:{<model>}:idem:<key>``   hash: ``state`` (pending/done), ``fp``, ``owner``, ``summary``;
  expires (a lease while pending, the idempotency TTL once done)
- ``<prefix>:{<model>}:sync:<step>:<name>``     hash: worker id -> gradient bytes (sync mode; dropped
  once the step is applied, else expires)
- ``<prefix>:{<model>}:sync:<step>:<name>:who`` set of the worker ids that contributed (expires)
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def model(self, model: str) -> str:
        return f"{self.prefix}:{{{model}}}:model"

    def param_index(self, model: str) -> str:
        return f"{self.prefix}:{{{model}}}:params"

    def param(self, model: str, name: str) -> str:
        return f"{self.prefix}:{{{model}}}:param:{name}"

    def idempotency(self, model: str, key: str) -> str:
        return f"{self.prefix}:{{{model}}}:idem:{key}"

    def sync_grads(self, model: str, step: int, name: str) -> str:
        return f"{self.prefix}:{{{model}}}:sync:{step}:{name}"

    def sync_workers(self, model: str, step: int, name: str) -> str:
        return f"{self.prefix}:{{{model}}}:sync:{step}:{name}:who"
