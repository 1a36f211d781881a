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

import numpy as np

from ..alerts.topics import Topics
from ..consent.state import ConsentEvent, ConsentState, Status
from .consent_cache import ConsentCache
from .quarantine import Quarantine
from .user_index import Column

Publish = Callable[[str, bytes], None]  # (topic, retained payload)
STATUSES = ("off", "paused", "calibrating", "active", "quarantined")
_CODE = {name: code for code, name in enumerate(STATUSES, start=1)}  # 0: never published


def user_status(state: ConsentState, now: datetime, baseline_ready: bool) -> str:
    """What the user's status topic says (pure)."""
    return status_word(state.allows_processing(now), state.status is Status.PAUSED, baseline_ready)


def status_word(allows_processing: bool, paused: bool, baseline_ready: bool) -> str:
    """What the user's status topic says, from what consent allows now (pure)."""
    if not allows_processing:
        return "off"
    if paused:
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
        self._users = consent.users  # the engine's user numbers
        self._status = Column(np.int8, 0)  # the status last published, by user number (1 byte a user)
        self._sweep_at = 0

    def known(self, user: str) -> str | None:
        """The status last published for ``user`` (None: never)."""
        i = self._users.get(user)
        code = int(self._status.values[i]) if i is not None and i < len(self._status.values) else 0
        return STATUSES[code - 1] if code else None

    def status_of(self, user: str, now: datetime, state: ConsentState | None = None, *, cached: bool = False) -> str:
        """``state``: consent just read; else the ledger is read now, or with ``cached`` the
        consent cache answers (engine start, after the cache was loaded in bulk)."""
        if user in self._quarantine:
            return "quarantined"
        if state is None and cached:
            return status_word(self._consent.may_process(user, now), self._consent.paused(user), self._baseline_ready(user))
        st = state if state is not None else self._consent.refresh(user)
        return user_status(st, now, self._baseline_ready(user))

    def update(self, user: str, now: datetime, *, force: bool = False, state: ConsentState | None = None, cached: bool = False) -> None:
        """Publish the user's status if it changed (``state``: consent just read, if any)."""
        status = self.status_of(user, now, state, cached=cached)
        if not force and self.known(user) == status:
            return
        i = self._users.number(user)
        self._status.ensure(len(self._users))[i] = _CODE[status]
        fields: dict[str, object] = {"schema_version": 1, "status": status, "since": now.isoformat()}
        reason = self._quarantine.reason(user)
        if reason is not None:
            fields["reason"] = reason
        body = json.dumps(fields).encode()
        self._publish(self.topics.status(user), body)

    def after_flush(self, users: list[str], now: datetime) -> None:
        """Users whose batches the detector just had: first seen, or calibration over."""
        for user in users:
            known = self.known(user)
            if known is None or (known == "calibrating" and self._baseline_ready(user)):
                self.update(user, now)

    def sweep(self, now: datetime) -> None:
        published = np.flatnonzero(self._status.values)
        if len(published) > self.sweep_size:
            start = self._sweep_at % len(published)
            published = np.roll(published, -start)[: self.sweep_size]
            self._sweep_at = start + self.sweep_size
        users = [self._users.names[i] for i in published.tolist()]
        try:  # one ledger read for the slice (a read per user was most of a tick): it refreshes the consent cache and the status
            history: dict[str, list[ConsentEvent]] | None = self._consent.histories(users)
        except Exception:  # noqa: BLE001 - read user by user instead, so a fault is one user's
            history = None
        for user in users:
            self._guarded(user, now, force=False, events=None if history is None else history[user])

    def _guarded(self, user: str, now: datetime, *, force: bool, cached: bool = False, events: list[ConsentEvent] | None = None) -> None:
        try:
            self.update(user, now, force=force, state=None if cached else self._consent.refresh(user, events), cached=cached)
        except Exception as exc:  # noqa: BLE001 - one user's stored consent must not stop the others
            if self._quarantine.add(user, "reading consent", exc):
                self.update(user, now)

    def announce(self, users: list[str], now: datetime) -> None:
        """These users' status, published again from the consent cache (engine start, broker
        reconnect; the engine loads the cache from the ledger in bulk first and announces in
        slices between ingest jobs)."""
        for user in users:
            self._guarded(user, now, force=True, cached=True)

    def clear(self, user: str) -> None:
        """Erasure: forget the user and clear the retained topic."""
        i = self._users.get(user)
        if i is not None and i < len(self._status.values):
            self._status.values[i] = 0
        self._publish(self.topics.status(user), b"")


__all__ = ["StatusPublisher", "user_status"]
