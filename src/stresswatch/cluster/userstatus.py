"""Per-user status topics (``{prefix}/status/{user}``, retained) from the cluster engine.

The owner of a user's partition publishes the user's status on change, as the single engine
does (:mod:`stresswatch.engine.status`, whose pure :func:`user_status` decides the word):
after the detector first has the user's data or their calibration ends, at a consent change
seen by the consent bucket's watch, when the user is quarantined, and an empty retained
message at erasure. What was last published is kept per owned user; a new owner starts
without it, so it publishes each user's status again at their next batch (the same retained
message) and at once for users whose consent changed while the partition had no owner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from ..alerts.topics import Topics

Publish = Callable[[str, bytes], None]  # (topic, retained payload)


class StatusBoard:
    def __init__(self, topics: Topics, publish: Publish) -> None:
        self.topics = topics
        self._publish = publish
        self._known: dict[str, str] = {}  # user -> the status last published by this engine

    def known(self, user: str) -> str | None:
        return self._known.get(user)

    def update(self, user: str, status: str, now: datetime, *, reason: str | None = None, force: bool = False) -> bool:
        """Publish ``status`` if it is not what this engine last published; True if published."""
        if not force and self._known.get(user) == status:
            return False
        self._known[user] = status
        fields: dict[str, object] = {"schema_version": 1, "status": status, "since": now.isoformat()}
        if reason is not None:
            fields["reason"] = reason
        self._publish(self.topics.status(user), json.dumps(fields).encode())
        return True

    def clear(self, user: str) -> None:
        """Erasure: forget the user and clear the retained topic (the confirmation a user's
        companion sees, as from the single engine)."""
        self._known.pop(user, None)
        self._publish(self.topics.status(user), b"")

    def forget(self, users: object) -> None:
        """A partition given up: its users' statuses are its next owner's to publish."""
        for user in users:  # type: ignore[attr-defined]
            self._known.pop(user, None)


__all__ = ["StatusBoard"]
