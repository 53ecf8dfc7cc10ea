"""Wire formats: one codec per media type, chosen once per request.

A codec turns a request body (read once, see :mod:`..admission`) into what the engine takes
(tensors and options), and the engine's results into a response body, without knowing HTTP:
no requests, no settings, no problem documents. What it needs of the server's limits comes in
a :class:`Limits`; what it refuses, it raises as a :class:`BodyError` with the status it calls
for, which the HTTP layer turns into problem+json. Adding a wire format is one module with a
class that has the methods of :class:`Codec`, registered in :data:`CODECS`.

Encoding never builds the body: an :class:`Encoded` is a list of parts (a small header, then
the arrays' own buffers) that the response hands to the transport as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ...engine import ParamRecord, RawTensors, StepResult
from ...settings import Settings
from ...store.base import Array

__all__ = [
    "CODECS",
    "BodyError",
    "Codec",
    "Encoded",
    "Limits",
    "StepBody",
    "StepOptions",
    "for_request",
    "for_response",
]

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Limits:
    """What a body may hold (the server's settings, as the codecs need them)."""

    max_tensor_elements: int = 1 << 25
    max_tensor_dims: int = 32
    max_params: int = 10_000
    max_json_depth: int = 32

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_tensor_elements,
            settings.max_tensor_dims,
            settings.max_params_per_request,
            settings.max_json_depth,
        )


class BodyError(Exception):
    """A body that cannot be taken: ``status`` (413, 415 or 422), a slug, and what is wrong where.

    ``errors`` are ``{"loc", "msg"}`` entries; ``extensions`` go into the problem document as
    they are (``limit``, ``error_count``...).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        errors: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})
        self.extensions = extensions


@dataclass(frozen=True, slots=True)
class StepOptions:
    """A step's options: the JSON body's fields besides ``gradients``, or the safetensors metadata."""

    return_params: bool = True
    expected_steps: dict[str, int] | None = None
    worker_id: int | None = None
    base_step: int | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class StepBody:
    """A step's gradients (widened to their parameters' dtypes) and options, and, where the format
    allows it without a copy, the gradients as received (what the step's log entry keeps)."""

    grads: dict[str, Array]
    options: StepOptions = field(default_factory=StepOptions)
    received: RawTensors | None = None


@dataclass(frozen=True, slots=True)
class Encoded:
    """A response body as parts: a header and the arrays' buffers, never joined."""

    media_type: str
    parts: tuple[Buffer, ...]

    @property
    def length(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)


class Codec(Protocol):
    """What a wire format provides. Bodies are read-only buffers; arrays decoded from them are
    views where the format allows (no copy)."""

    media_type: ClassVar[str]

    def decode_step(self, body: memoryview, limits: Limits) -> StepBody:
        """The gradients (float32/float64 arrays; F16/BF16 widened exactly) and the step's options."""
        ...

    def decode_values(self, body: memoryview, limits: Limits) -> dict[str, Array]:
        """Parameter values to set (``PUT /params``): at least one."""
        ...

    def decode_value(self, body: memoryview, name: str, limits: Limits) -> Array:
        """One parameter's value (``PUT /params/{name}``)."""
        ...

    def encode_step(self, results: Mapping[str, StepResult], with_values: bool) -> Encoded: ...

    def encode_params(self, params: Mapping[str, ParamRecord], include: frozenset[str]) -> Encoded:
        """Several parameters (``GET /params``), with their rule's state buffers as ``include`` asks
        (``state``: all of them; ``velocity``: that one, as the API had it before named buffers)."""
        ...

    def encode_param(self, rec: ParamRecord, include: frozenset[str]) -> Encoded:
        """One parameter (``GET /params/{name}``)."""
        ...


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _codecs() -> dict[str, Codec]:
    from .json import JsonCodec
    from .safetensors import SafetensorsCodec

    return {codec.media_type: codec for codec in (JsonCodec(), SafetensorsCodec())}


CODECS: dict[str, Codec] = _codecs()
JSON_MEDIA = "application/json"


def for_request(content_type: str | None) -> Codec:
    """The codec of a request body's media type (``application/*+json`` is JSON); 415 otherwise."""
    media = _media(content_type or "")
    if media.startswith("application/") and media.endswith("+json"):
        media = JSON_MEDIA
    codec = CODECS.get(media)
    if codec is None:
        accepted = ", ".join(CODECS)
        raise BodyError(
            415,
            "unsupported-media-type",
            f"send the body as Content-Type: {' or '.join(CODECS)} (got {content_type or 'none'!r})",
            headers={"Accept-Post": accepted},
        )
    return codec


def for_response(accept: str | None) -> Codec:
    """The codec a client asked for with ``Accept`` (q-values are ignored); JSON by default."""
    for part in (accept or "").split(","):
        codec = CODECS.get(_media(part))
        if codec is not None and codec.media_type != JSON_MEDIA:
            return codec
    return CODECS[JSON_MEDIA]
