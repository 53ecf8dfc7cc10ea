"""The sans-I/O protocol between the clients and the flows: :class:`Request`, :class:`Response`,
:class:`Sleep`, :func:`send` and the :data:`Flow` type.

Each API operation is a *flow*: a generator that yields instructions and returns the
operation's result (or raises). A :class:`Request` is to be sent: the client sends its
:class:`Response` back into the flow, or throws the :class:`TransportError` in when there was
none (the flow may catch it and retry). A :class:`Sleep` is to be waited out; the client sends
``None`` back. A client drives a flow with its own transport and sleep, so ``Client`` and
``AsyncClient`` run the same request building, response parsing, error mapping and multi-request
logic (the ``init_params(exist_ok=True)`` loop, the step retries), and differ only in how they
send and wait. The flows are in ``_flows`` (models and parameters) and ``_steps`` (steps).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

T = TypeVar("T")

Buffer: TypeAlias = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request to send; ``path`` is percent-encoded and relative to the base URL."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: tuple[Buffer, ...] = ()
    """The body as parts (a safetensors header, then the arrays' buffers), sent as they are."""

    @property
    def length(self) -> int:
        return sum(memoryview(p).nbytes for p in self.content)


@dataclass(frozen=True, slots=True)
class Response:
    """The parts of an HTTP response a flow looks at, plus what was requested (for messages).

    ``content`` is the body: bytes, or (from the SDK's own transport) a view of the one buffer it
    was read into, from which safetensors arrays are taken without a copy.
    """

    status: int
    headers: httpx.Headers
    content: Buffer | npt.NDArray[np.uint8]
    method: str
    url: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the flow goes on (the client sends ``None`` back)."""

    seconds: float


Instruction: TypeAlias = Request | Sleep
Flow: TypeAlias = Generator[Instruction, Response | None, T]


def send(request: Request) -> Flow[Response]:
    """Yield ``request`` and return its response: ``response = yield from send(request)``.

    The client throws a :class:`TransportError` in here when the request got no response.
    """
    response = yield request
    if response is None:  # pragma: no cover - a client bug
        raise RuntimeError("a Request must be answered with a Response")
    return response
