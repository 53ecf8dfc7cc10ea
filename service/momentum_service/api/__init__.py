"""The HTTP layer: routes, schemas, body parsing and problem+json error mapping."""

from .app import create_app

__all__ = ["create_app"]
