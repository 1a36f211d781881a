"""Users set aside after a fault in their own data path, so that everyone else goes on.

A fault while processing one user's data (frame building, detector, gate, dispatch, a stored
consent message) is caught at that user's boundary; the user is quarantined with a short
reason (the kind of fault, never a value) that their status topic shows, and their further
batches are dropped and counted until the engine restarts. Logs name the user and the
exception type only.
"""

from __future__ import annotations

import logging

log = logging.getLogger("stresswatch.engine")


class Quarantine:
    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self.dropped_batches = 0

    def __contains__(self, user: object) -> bool:
        return user in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def reason(self, user: str) -> str | None:
        return self._reasons.get(user)

    def add(self, user: str, where: str, exc: BaseException) -> bool:
        """Quarantine ``user`` (``where``: the step that failed); False if already there."""
        if user in self._reasons:
            return False
        self._reasons[user] = f"{where} failed ({type(exc).__name__})"
        log.error("user %s quarantined: %s failed (%s); other users are not affected", user, where, type(exc).__name__)
        return True

    def forget(self, user: str) -> None:
        self._reasons.pop(user, None)


__all__ = ["Quarantine"]
