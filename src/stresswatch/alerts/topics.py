"""The MQTT topic tree of SPEC.md ("MQTT topics"), under a configurable prefix."""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.ids import validate_id

# User and worker ids become topic levels: the one id grammar (no wildcards, separators,
# control characters; stresswatch.wire.ids). Raises InvalidId (a ParseError and a ValueError).
check_id = validate_id


@dataclass(frozen=True)
class Topics:
    prefix: str = "stresswatch/v1"

    def ingest(self, user: str) -> str:
        return f"{self.prefix}/ingest/{check_id('user', user)}"

    def ingested(self, user: str) -> str:
        """The engine's confirmations of the user's batches, once they are in its ingest log."""
        return f"{self.prefix}/ingested/{check_id('user', user)}"

    def consent(self, user: str) -> str:
        return f"{self.prefix}/consent/{check_id('user', user)}"

    def alerts(self, worker: str) -> str:
        return f"{self.prefix}/alerts/{check_id('worker', worker)}"

    def acks(self, worker: str) -> str:
        return f"{self.prefix}/acks/{check_id('worker', worker)}"

    def replies(self, worker: str) -> str:
        """The engine's answers to the worker's acks and list requests (alerts/replies.py)."""
        return f"{self.prefix}/replies/{check_id('worker', worker)}"

    def checkin(self, user: str) -> str:
        """The person's own request for contact (alerts/checkin.py)."""
        return f"{self.prefix}/checkin/{check_id('user', user)}"

    def status(self, user: str) -> str:
        return f"{self.prefix}/status/{check_id('user', user)}"

    @property
    def engine_status(self) -> str:
        return f"{self.prefix}/engine/status"
