"""From responses to exceptions: the :class:`APIError` of an error status, and
:class:`UnexpectedResponse` for an answer the SDK cannot read (the exception tree is in ``_exceptions``)."""

from __future__ import annotations

from typing import Any

from ._exceptions import APIError, UnexpectedResponse, api_error
from ._flow import Response
from ._tensors import loads


def error_from_response(response: Response) -> APIError:
    """The :class:`APIError` subclass instance for an error response (problem+json or not)."""
    problem: dict[str, Any] = {}
    try:
        body = loads(response.content) if len(response.content) else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    else:
        text = bytes(response.content).decode("utf-8", "replace").strip()
        if text:
            problem = {"detail": text[:500]}
    return api_error(response.status, problem, headers=response.headers, method=response.method, url=response.url)


def raise_for_status(response: Response) -> None:
    """Raise the mapped :class:`APIError` unless the status is 2xx."""
    if not 200 <= response.status <= 299:
        raise error_from_response(response)


def unexpected(response: Response, message: str) -> UnexpectedResponse:
    """The :class:`UnexpectedResponse` to raise for ``response``, saying ``message``."""
    return UnexpectedResponse(
        f"unexpected response to {response.method} {response.url} ({response.status}): {message}",
        status=response.status,
        method=response.method,
        url=response.url,
    )
