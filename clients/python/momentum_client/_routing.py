"""Where to send a model's requests: the base URL, or (with ``follow_owner``) the replica that owns it.

A server replica that forwards a request to the model's owner adds ``Momentum-Owner: <url>`` to the
answer. With ``follow_owner=True`` a client remembers it, per model, and sends that model's next
requests there directly: one hop instead of two. When the owner changes, the replica it asks
forwards again and names the new owner; when the owner does not answer, the client forgets it and
goes back to the base URL (the flows retry a step with the same Idempotency-Key either way).

Off by default: behind a load balancer the replicas' own URLs (``MOMENTUM_ADVERTISE_URL``) may not
be reachable from the workers, and the client then sends the API key only to the base URL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

__all__ = ["OwnerRoutes"]

_MODEL_PATH = re.compile(r"^/v1/models/(?P<model>[^/?]+)(?:/|$)")
MAX_MODELS = 10_000


class OwnerRoutes:
    def __init__(self, base_url: str, *, enabled: bool) -> None:
        self.base_url = base_url
        self.enabled = enabled
        self._owners: dict[str, str] = {}

    @staticmethod
    def _model(path: str) -> str | None:
        match = _MODEL_PATH.match(path)
        return None if match is None else match.group("model")

    def url(self, path: str) -> str:
        """The URL to send a request for ``path`` (percent-encoded, relative to the base URL) to."""
        if self.enabled and self._owners:
            model = self._model(path)
            owner = self._owners.get(model) if model is not None else None
            if owner is not None:
                return owner + path
        return self.base_url + path

    def learn(self, path: str, headers: Mapping[str, str]) -> None:
        """An answer came for ``path``: remember the owner it names (if any)."""
        if not self.enabled:
            return
        owner = headers.get("momentum-owner")
        model = self._model(path)
        if owner is None or model is None:
            return
        owner = owner.rstrip("/")
        parts = urlsplit(owner)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            return  # not a base URL: ignored
        if len(self._owners) >= MAX_MODELS and model not in self._owners:
            self._owners.clear()
        self._owners[model] = owner

    def forget(self, path: str) -> None:
        """The owner remembered for ``path``'s model did not answer: back to the base URL."""
        model = self._model(path)
        if model is not None:
            self._owners.pop(model, None)
