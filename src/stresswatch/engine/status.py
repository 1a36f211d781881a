"""Per-user status topics (``off``, ``paused``, ``calibrating``, ``active``), published on change.

Consent changes and a user's first batch or end of calibration publish at once; what only
time changes (a consent expiring, a ledger written by another process) is found by
:meth:`StatusPublisher.sweep`, which re-reads a bounded slice of the users per tick (all of
them up to ``sweep_size``): reading every user's consent every tick cost O(users) SQLite
reads and was the largest cost at 3,000 users (docs/SCALING.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from ..alerts.topics import Topics
from ..consent.state import ConsentState, Status
from .consent_cache import ConsentCache
from .quarantine import Quarantine

Publish = Callable[[str, bytes], None]  # (topic, retained payload)


def user_status(state: ConsentState, now: datetime, baseline_ready: bool) -> str:
    """What the user's status topic says (pure)."""
    if not state.allows_processing(now):
        return "off"
    if state.status is Status.PAUSED:
        return "paused"
    return "active" if baseline_ready else "calibrating"


class StatusPublisher:
    def __init__(
        self,
        topics: Topics,
        consent: ConsentCache,
        baseline_ready: Callable[[str], bool],
        publish: Publish,
        *,
        quarantine: Quarantine | None = None,
        sweep_size: int = 2_000,
    ) -> None:
        self.topics = topics
        self._consent = consent
        self._baseline_ready = baseline_ready
        self._publish = publish
        self._quarantine = quarantine if quarantine is not None else Quarantine()
        self.sweep_size = sweep_size
        self._status: dict[str, str] = {}
        self._sweep_at = 0

    def known(self, user: str) -> str | None:
        """The status last published for ``user`` (None: never)."""
        return self._status.get(user)

    def status_of(self, user: str, now: datetime, state: ConsentState | None = None) -> str:
        if user in self._quarantine:
            return "quarantined"
        st = state if state is not None else self._consent.refresh(user)
        return user_status(st, now, self._baseline_ready(user))

    def update(self, user: str, now: datetime, *, force: bool = False, state: ConsentState | None = None) -> None:
        """Publish the user's status if it changed (``state``: consent just read, if any)."""
        status = self.status_of(user, now, state)
        if not force and self._status.get(user) == status:
            return
        self._status[user] = status
        fields: dict[str, object] = {"schema_version": 1, "status": status, "since": now.isoformat()}
        reason = self._quarantine.reason(user)
        if reason is not None:
            fields["reason"] = reason
        body = json.dumps(fields).encode()
        self._publish(self.topics.status(user), body)

    def after_flush(self, users: list[str], now: datetime) -> None:
        """Users whose batches the detector just had: first seen, or calibration over."""
        for user in users:
            known = self._status.get(user)
            if known is None or (known == "calibrating" and self._baseline_ready(user)):
                self.update(user, now)

    def sweep(self, now: datetime) -> None:
        users = list(self._status)
        if len(users) <= self.sweep_size:
            chosen = users
        else:
            start = self._sweep_at % len(users)
            chosen = (users[start:] + users[:start])[: self.sweep_size]
            self._sweep_at = start + self.sweep_size
        for user in chosen:  # one ledger read each: it refreshes the consent cache and the status
            self._guarded(user, now, force=False)

    def _guarded(self, user: str, now: datetime, *, force: bool) -> None:
        try:
            self.update(user, now, force=force, state=self._consent.refresh(user))
        except Exception as exc:  # noqa: BLE001 - one user's stored consent must not stop the others
            if self._quarantine.add(user, "reading consent", exc):
                self.update(user, now)

    def announce(self, users: list[str], now: datetime) -> None:
        """Every known user's status, published again (engine start, broker reconnect)."""
        for user in users:
            self._guarded(user, now, force=True)

    def clear(self, user: str) -> None:
        """Erasure: forget the user and clear the retained topic."""
        self._status.pop(user, None)
        self._publish(self.topics.status(user), b"")


__all__ = ["StatusPublisher", "user_status"]
