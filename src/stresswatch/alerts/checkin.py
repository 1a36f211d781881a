"""Check-ins: the person asks for contact themselves (``stresswatch checkin``).

Engine side, :func:`decision_for`: a check-in becomes an :class:`AlertDecision` with reason
``self_report`` and the person's level, handed to the same Dispatcher as a detector alert
(consent gate at send time, group expansion, quiet hours, escalation; its own cooldown,
``alerts.checkin_cooldown_s``). Its ``alert_id`` is derived from the check-in id, so a
check-in that arrives twice (re-sent after a lost PUBACK) is recorded once.

Companion side, :class:`CheckinQueue`: a check-in is committed to a small SQLite file before
it is sent and deleted only after the broker's PUBACK, so one asked for offline goes out
when the broker is reachable again, once.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from .. import sqlite
from ..errors import StorageError
from ..model import AlertDecision, AlertLevel, Reason
from ..wire.checkin import MAX_AGE_S, CheckinMessage, decode_checkin

_CHECKIN_NAMESPACE = uuid.UUID("0b5e7d3a-91c4-5f28-8e6a-4d2c1b9f7a35")


def checkin_alert_id(user: str, checkin_id: str) -> str:
    return str(uuid.uuid5(_CHECKIN_NAMESPACE, f"{user}|{checkin_id}"))


def decision_for(user: str, payload: bytes, *, now: datetime, topic: str = "checkin") -> AlertDecision:
    """Pure: the alert a check-in raises, or :class:`ParseError`."""
    msg = decode_checkin(payload, topic_user=user, now=now, topic=topic)
    return AlertDecision(
        alert_id=checkin_alert_id(user, msg.checkin_id),
        user=user,
        raised_at=msg.at,
        episode_start=msg.at,
        level=msg.level,
        reasons=(Reason.SELF_REPORT,),
        score=0.0,  # no physiology: the person asked
        note=msg.note,
    )


@dataclass(frozen=True)
class Queued:
    checkin_id: str
    user: str
    payload: bytes
    at: datetime


class CheckinQueue:
    """The companion's durable queue (one thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite.connect(self.path, "synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS checkins (checkin_id TEXT PRIMARY KEY, user TEXT NOT NULL,"
                " at TEXT NOT NULL, payload BLOB NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the check-in queue: {exc}", path=self.path) from None

    def add(self, user: str, *, now: datetime, level: AlertLevel, note: str | None) -> CheckinMessage:
        msg = CheckinMessage(checkin_id=str(uuid.uuid4()), user=user, at=now, level=level, note=note)
        try:
            self._db.execute(
                "INSERT INTO checkins (checkin_id, user, at, payload) VALUES (?, ?, ?, ?)",
                (msg.checkin_id, user, now.isoformat(), msg.encode()),
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot queue the check-in: {exc}", path=self.path) from None
        return msg

    def pending(self, user: str | None = None) -> list[Queued]:
        sql, args = "SELECT checkin_id, user, payload, at FROM checkins", ()
        if user is not None:
            sql, args = sql + " WHERE user = ?", (user,)
        rows = self._db.execute(sql + " ORDER BY at", args).fetchall()
        return [Queued(r[0], r[1], bytes(r[2]), datetime.fromisoformat(r[3])) for r in rows]

    def drop_stale(self, now: datetime) -> list[Queued]:
        """Remove (and return) check-ins too old for the engine to accept (``MAX_AGE_S``)."""
        stale = [q for q in self.pending() if q.at < now - timedelta(seconds=MAX_AGE_S - 60)]
        for q in stale:
            self.sent(q.checkin_id)
        return stale

    def sent(self, checkin_id: str) -> None:
        """The broker acknowledged it: forget it."""
        self._db.execute("DELETE FROM checkins WHERE checkin_id = ?", (checkin_id,))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CheckinQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CheckinQueue", "Queued", "checkin_alert_id", "decision_for"]
