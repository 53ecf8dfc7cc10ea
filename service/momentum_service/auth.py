"""API keys and their scopes (domain: no HTTP here).

A key is a random token a client sends as ``Authorization: Bearer <key>``. The server never
holds keys in clear: it is configured with their SHA-256 hashes, one key per line, each with
its scopes::

    # sha256 of the key                                              scopes
    5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8 write:mnist-* read:*

A scope is ``read:PATTERN``, ``write:PATTERN`` or ``admin:PATTERN``, where PATTERN is a glob
over model names (``*``, ``?``, ``[...]``). ``admin`` includes ``write``, which includes
``read``: ``read`` reads models and parameters, ``write`` also steps and sets parameter
values, ``admin`` also creates, replaces, patches and deletes models and parameters.

Presented keys are hashed and compared with every configured hash in constant time
(:func:`hmac.compare_digest`, without stopping at the first match), so the time taken says
nothing about which hash, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

__all__ = ["LEVELS", "ApiKey", "KeyRing", "Scope", "hash_key", "new_key"]

LEVELS = ("read", "write", "admin")
_RANK = {level: i for i, level in enumerate(LEVELS)}
_HASH = re.compile(r"^[0-9a-f]{64}$")
_PATTERN = re.compile(r"^[A-Za-z0-9._*?\[\]!-]{1,128}$")


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return "msk_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Scope:
    level: str
    pattern: str

    @classmethod
    def parse(cls, text: str) -> Scope:
        level, sep, pattern = text.partition(":")
        if not sep or level not in _RANK:
            raise ValueError(f"a scope is read:PATTERN, write:PATTERN or admin:PATTERN, got {text!r}")
        if not _PATTERN.match(pattern):
            raise ValueError(f"scope {text!r}: the pattern must be a glob over model names (1 to 128 characters)")
        return cls(level, pattern)

    def grants(self, level: str, model: str) -> bool:
        return _RANK[self.level] >= _RANK[level] and fnmatchcase(model, self.pattern)

    def __str__(self) -> str:
        return f"{self.level}:{self.pattern}"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key: its hash, its scopes, and where it was configured (for logs)."""

    digest: str
    scopes: tuple[Scope, ...]
    label: str

    def allows(self, level: str, model: str) -> bool:
        return any(scope.grants(level, model) for scope in self.scopes)

    def line(self) -> str:
        return f"{self.digest} {' '.join(map(str, self.scopes))}"


class KeyRing:
    """The configured keys. Empty means no authentication (see the server's start-up rules)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys
        self._digests = [bytes.fromhex(k.digest) for k in keys]

    def __bool__(self) -> bool:
        return bool(self.keys)

    @classmethod
    def parse(cls, text: str, source: str = "keys") -> KeyRing:
        """Lines ``<sha256 hex> <scope> [<scope> ...]``; blank lines and ``#`` comments are skipped.

        ``ValueError`` names the line at fault.
        """
        keys = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            digest, *scopes = line.split()
            where = f"{source} line {number}"
            if not _HASH.match(digest):
                raise ValueError(f"{where}: expected the key's SHA-256 as 64 lowercase hex digits, got {digest[:70]!r}")
            if not scopes:
                raise ValueError(f"{where}: a key needs at least one scope, e.g. read:*")
            try:
                parsed = tuple(Scope.parse(s) for s in scopes)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            keys.append(ApiKey(digest, parsed, where))
        return cls(keys)

    @classmethod
    def load(cls, path: str | Path | None, inline: str | None = None) -> KeyRing:
        """The keys of a keys file and/or inline lines (``;`` may separate them)."""
        keys: list[ApiKey] = []
        if path is not None:
            keys += cls.parse(Path(path).read_text(), str(path)).keys
        if inline:
            keys += cls.parse(inline.replace(";", "\n"), "MOMENTUM_API_KEYS").keys
        return cls(keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key whose hash matches, compared with every configured hash in constant time."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for key, configured in zip(self.keys, self._digests, strict=True):
            if hmac.compare_digest(digest, configured):
                found = key
        return found
