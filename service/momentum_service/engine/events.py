"""What the engine tells an observer (metrics): :class:`Events`, whose methods do nothing here.

The engine calls these at the moments that matter to someone watching a deployment; the HTTP
layer's :class:`~momentum_service.telemetry.Telemetry` counts them for Prometheus. Keeping the
hooks here keeps the engine free of any metrics library (and its tests free of a registry).
"""

from __future__ import annotations

__all__ = ["Events"]


class Events:
    """No-op hooks; a subclass counts what it wants. Every method must be cheap and never raise."""

    def pushed(self, model: str, outcome: str, staleness: int | None = None) -> None:
        """A push was ``applied`` (an update, acknowledged), ``replayed`` (an Idempotency-Key seen before), or, in sync
        mode, ``contributed`` (a worker's share, averaged once all arrived) or ``pending`` (answered 202)."""

    def stepped(self, model: str, params: int) -> None:
        """One update of ``params`` parameters was applied and is as durable as the model asks (a push in
        async/bounded, a whole sync step): what its workers are told."""

    def sync_waited(self, model: str, seconds: float) -> None:
        """A sync push waited this long for the other workers (until its step was applied or 202)."""

    def owner_changed(self, model: str, event: str) -> None:
        """This replica ``took`` the model (built from the journal), ``released`` it (idle) or ``lost`` it."""

    def written(self, model: str, nbytes: int, snapshot: bool, log_bytes: int) -> None:
        """A batch of the model's log (or a snapshot) reached the journal; ``log_bytes``: its log since the
        last snapshot."""
