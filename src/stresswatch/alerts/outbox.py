"""The durable outbox and alert lifecycle store (SQLite).

* ``alerts``: one row per alert (the detector's decision and its :class:`AlertRecord`);
* ``deliveries``: one row per (alert, worker, notice) to publish; a row is *pending* until
  the broker's PUBACK, then *delivered*; a pending row survives engine and broker restarts
  and is published again with the same ``alert_id`` (at-least-once; clients drop duplicates);
* ``alert_events``: every lifecycle change (who, what, when), for export and audit;
* ``detector_save``: the start of the last detector save that stored every chunk of users it
  had to (the chunks are files beside this database; docs/STORAGE.md);
* ``detector_state``: the single-blob snapshot of earlier versions (``Detector.to_bytes()``),
  read at start and removed by the first complete chunked save.

Each change is one transaction, so a crash leaves either the old or the new row.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import sqlite
from ..errors import StorageError
from ..model import AlertDecision, AlertLevel, Reason
from .lifecycle import OPEN_STATES, AlertRecord, AlertState, Outcome

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id      TEXT PRIMARY KEY,
    user          TEXT NOT NULL,
    raised_at     TEXT NOT NULL,
    episode_start TEXT NOT NULL,
    level         TEXT NOT NULL,
    reasons       TEXT NOT NULL,
    score         REAL NOT NULL,
    created_at    TEXT NOT NULL,
    state         TEXT NOT NULL,
    verdict       TEXT,
    step          INTEGER NOT NULL DEFAULT 0,
    reminders     INTEGER NOT NULL DEFAULT 0,
    targets       TEXT NOT NULL DEFAULT '[]',
    last_sent_at  TEXT,
    due_at        TEXT,
    acked_by      TEXT,
    acked_at      TEXT,
    outcome       TEXT,
    note          TEXT,
    resolved_by   TEXT,
    resolved_at   TEXT,
    person_note   TEXT
);
CREATE INDEX IF NOT EXISTS alerts_user ON alerts(user, created_at);
CREATE INDEX IF NOT EXISTS alerts_user_sent ON alerts(user, last_sent_at);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts(state, due_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id     TEXT NOT NULL REFERENCES alerts(alert_id) ON DELETE CASCADE,
    worker       TEXT NOT NULL,
    notice       INTEGER NOT NULL,
    enqueued_at  TEXT NOT NULL,
    delivered_at TEXT,
    dropped      TEXT,
    UNIQUE (alert_id, worker, notice)
);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries(id) WHERE delivered_at IS NULL AND dropped IS NULL;
CREATE TABLE IF NOT EXISTS alert_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    user     TEXT NOT NULL,
    at       TEXT NOT NULL,
    kind     TEXT NOT NULL,
    actor    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS alert_events_user ON alert_events(user, seq);
CREATE TABLE IF NOT EXISTS detector_state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    saved_at   TEXT NOT NULL,
    blob       BLOB NOT NULL,
    ingest_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS detector_save (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    saved_at      TEXT NOT NULL,
    complete_seq  INTEGER NOT NULL,
    chunk_users   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS erasure_tombstones (
    at           TEXT NOT NULL,
    store        TEXT NOT NULL,
    rows_removed INTEGER NOT NULL
);
"""


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat() if t is not None else None


def _dt(s: str | None) -> datetime | None:
    return datetime.fromisoformat(s) if s else None


@dataclass(frozen=True)
class Delivery:
    id: int
    alert_id: str
    user: str
    worker: str
    notice: int
    queued_at: datetime


_RECORD_COLS = (
    "alert_id, user, state, verdict, step, reminders, targets, last_sent_at, due_at, acked_by, acked_at,"
    " outcome, note, resolved_by, resolved_at, created_at"
)


def _record(r: tuple[Any, ...]) -> AlertRecord:
    return AlertRecord(
        alert_id=r[0],
        user=r[1],
        state=AlertState(r[2]),
        verdict=r[3],
        step=r[4],
        reminders=r[5],
        targets=tuple(json.loads(r[6])),
        last_sent_at=_dt(r[7]),
        due_at=_dt(r[8]),
        acked_by=r[9],
        acked_at=_dt(r[10]),
        outcome=Outcome(r[11]) if r[11] else None,
        note=r[12],
        resolved_by=r[13],
        resolved_at=_dt(r[14]),
        queued_at=_dt(r[15]),
    )


class Outbox:
    """One connection, one thread. ``synchronous=NORMAL`` in WAL mode: a committed row survives
    a process crash (the engine's failure mode); only an OS crash may lose the last commits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.enqueued: list[Delivery] = []  # deliveries added by the last save()
        try:
            self._db = sqlite.connect(self.path, "synchronous=NORMAL", "foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            if "ingest_seq" not in {r[1] for r in self._db.execute("PRAGMA table_info(detector_state)")}:
                self._db.execute("ALTER TABLE detector_state ADD COLUMN ingest_seq INTEGER NOT NULL DEFAULT 0")
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(alerts)")}
            if "person_note" not in cols:  # an outbox written before check-ins (stresswatch checkin)
                self._db.execute("ALTER TABLE alerts ADD COLUMN person_note TEXT")
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open alert outbox: {exc}", path=self.path) from None

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One SQLite transaction; nested calls join the outer one (see :mod:`stresswatch.sqlite`)."""
        return sqlite.transaction(self._db)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> sqlite3.Connection:
        return self._db

    # -- alerts ------------------------------------------------------------------------
    def record_raised(self, d: AlertDecision, now: datetime) -> bool:
        """Store a raised alert; False if this alert_id is already stored (restart, replay)."""
        try:
            with self.transaction():
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO alerts (alert_id, user, raised_at, episode_start, level, reasons, score,"
                    " created_at, state, person_note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'raised', ?)",
                    (
                        d.alert_id,
                        d.user,
                        _iso(d.raised_at),
                        _iso(d.episode_start),
                        d.level.value,
                        json.dumps([r.value for r in d.reasons]),
                        float(d.score),
                        _iso(now),
                        d.note,
                    ),
                )
                if cur.rowcount:
                    self._event(d.alert_id, d.user, now, "raised", None, None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot record alert: {exc}", path=self.path) from None
        return bool(cur.rowcount)

    def decision(self, alert_id: str) -> AlertDecision:
        r = self._db.execute(
            "SELECT alert_id, user, raised_at, episode_start, level, reasons, score, person_note FROM alerts WHERE alert_id = ?",
            (alert_id,),
        ).fetchone()
        if r is None:
            raise KeyError(alert_id)
        return AlertDecision(
            r[0], r[1], datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3]), AlertLevel(r[4]),
            tuple(Reason(x) for x in json.loads(r[5])), r[6], r[7],
        )  # fmt: skip

    def get(self, alert_id: str) -> AlertRecord | None:
        r = self._db.execute(f"SELECT {_RECORD_COLS} FROM alerts WHERE alert_id = ?", (alert_id,)).fetchone()
        return _record(r) if r else None

    def records(self, user: str | None = None) -> list[AlertRecord]:
        if user is None:
            rows = self._db.execute(f"SELECT {_RECORD_COLS} FROM alerts ORDER BY created_at, alert_id")
        else:
            rows = self._db.execute(f"SELECT {_RECORD_COLS} FROM alerts WHERE user = ? ORDER BY created_at, alert_id", (user,))
        return [_record(r) for r in rows]

    def records_for_worker(
        self, worker: str, *, states: tuple[AlertState, ...] | None = None, limit: int = 200
    ) -> list[AlertRecord]:
        """Alerts sent to ``worker`` (directly or as a member of a group), newest first."""
        sql = f"SELECT {_RECORD_COLS} FROM alerts WHERE EXISTS (SELECT 1 FROM json_each(targets) WHERE value = ?)"
        args: list[Any] = [worker]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += [st.value for st in states]
        rows = self._db.execute(f"{sql} ORDER BY created_at DESC, alert_id LIMIT ?", (*args, limit))
        return [_record(r) for r in rows]

    def due(self, now: datetime) -> list[AlertRecord]:
        """Open alerts whose scheduled time has come (deferred, escalation, reminder)."""
        states = tuple(s.value for s in OPEN_STATES)
        rows = self._db.execute(
            f"SELECT {_RECORD_COLS} FROM alerts WHERE state IN (?, ?, ?) AND due_at IS NOT NULL AND due_at <= ?"
            " ORDER BY due_at",
            (*states, _iso(now)),
        )
        return [_record(r) for r in rows]

    def next_due_at(self) -> datetime | None:
        states = tuple(s.value for s in OPEN_STATES)
        r = self._db.execute("SELECT MIN(due_at) FROM alerts WHERE state IN (?, ?, ?)", states).fetchone()
        return _dt(r[0])

    def last_sent_at(self, user: str, *, excluding: str | None = None, self_report: bool | None = None) -> datetime | None:
        """When an alert about ``user`` was last sent; ``self_report`` True/False: only check-ins /
        only detector alerts (each kind has its own cooldown)."""
        sql = "SELECT MAX(last_sent_at) FROM alerts WHERE user = ? AND alert_id != ?"
        if self_report is not None:
            sql += " AND (instr(reasons, '\"self_report\"') > 0) = ?"
        args = (user, excluding or "") + ((self_report,) if self_report is not None else ())
        return _dt(self._db.execute(sql, args).fetchone()[0])

    def save(
        self,
        rec: AlertRecord,
        kind: str,
        now: datetime,
        *,
        actor: str | None = None,
        detail: str | None = None,
        enqueue: tuple[str, ...] = (),
    ) -> AlertRecord:
        """Persist a lifecycle change, its event row and any new deliveries, atomically."""
        try:
            with self.transaction():
                self._db.execute(
                    "UPDATE alerts SET state=?, verdict=?, step=?, reminders=?, targets=?, last_sent_at=?, due_at=?,"
                    " acked_by=?, acked_at=?, outcome=?, note=?, resolved_by=?, resolved_at=? WHERE alert_id=?",
                    (
                        rec.state.value, rec.verdict, rec.step, rec.reminders, json.dumps(list(rec.targets)),
                        _iso(rec.last_sent_at), _iso(rec.due_at), rec.acked_by, _iso(rec.acked_at),
                        rec.outcome.value if rec.outcome else None, rec.note, rec.resolved_by, _iso(rec.resolved_at),
                        rec.alert_id,
                    ),
                )  # fmt: skip
                self.enqueued = []
                for worker in enqueue:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO deliveries (alert_id, worker, notice, enqueued_at) VALUES (?, ?, ?, ?)",
                        (rec.alert_id, worker, rec.notice, _iso(now)),
                    )
                    if cur.rowcount:
                        self.enqueued.append(Delivery(int(cur.lastrowid or 0), rec.alert_id, rec.user, worker, rec.notice, rec.queued_at or now))
                self._event(rec.alert_id, rec.user, now, kind, actor, detail)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot save alert {rec.alert_id}: {exc}", path=self.path) from None
        return rec

    def _event(self, alert_id: str, user: str, at: datetime, kind: str, actor: str | None, detail: str | None) -> None:
        self._db.execute(
            "INSERT INTO alert_events (alert_id, user, at, kind, actor, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (alert_id, user, _iso(at), kind, actor, detail),
        )

    def events(self, user: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT alert_id, at, kind, actor, detail FROM alert_events WHERE user = ? ORDER BY seq", (user,)
        ).fetchall()
        return [{"alert_id": r[0], "at": r[1], "kind": r[2], "actor": r[3], "detail": r[4]} for r in rows]

    # -- deliveries --------------------------------------------------------------------
    def pending(self, limit: int = 10_000, exclude: int = 0) -> list[Delivery]:
        """Deliveries not yet acknowledged by the broker, oldest first (``limit`` plus room
        for ``exclude`` rows the caller already has in flight)."""
        rows = self._db.execute(
            "SELECT d.id, d.alert_id, a.user, d.worker, d.notice, a.created_at FROM deliveries d JOIN alerts a USING (alert_id)"
            " WHERE d.delivered_at IS NULL AND d.dropped IS NULL ORDER BY d.id LIMIT ?",
            (limit + exclude,),
        ).fetchall()
        return [Delivery(*r[:5], datetime.fromisoformat(r[5])) for r in rows]

    def mark_delivered(self, ids: list[int], now: datetime) -> None:
        if not ids:
            return
        with self.transaction():
            self._db.executemany(
                "UPDATE deliveries SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL", [(_iso(now), i) for i in ids]
            )

    def reopen_delivered(self, since: datetime) -> int:
        """Make deliveries acknowledged by the broker at or after ``since`` pending again."""
        with self.transaction():
            return self._db.execute(
                "UPDATE deliveries SET delivered_at = NULL WHERE delivered_at >= ? AND dropped IS NULL", (_iso(since),)
            ).rowcount

    def drop_pending(self, alert_id: str, reason: str) -> int:
        with self.transaction():
            return self._db.execute(
                "UPDATE deliveries SET dropped = ? WHERE alert_id = ? AND delivered_at IS NULL AND dropped IS NULL",
                (reason, alert_id),
            ).rowcount

    def drop_delivery(self, delivery_id: int, reason: str) -> None:
        """One delivery that can never be published (its recipient cannot form a topic)."""
        with self.transaction():
            self._db.execute(
                "UPDATE deliveries SET dropped = ? WHERE id = ? AND delivered_at IS NULL AND dropped IS NULL", (reason, delivery_id)
            )

    def delivery_counts(self) -> dict[str, int]:
        r = self._db.execute(
            "SELECT COUNT(*), COUNT(delivered_at), COUNT(dropped) FROM deliveries"
        ).fetchone()
        return {"total": r[0], "delivered": r[1], "dropped": r[2], "pending": r[0] - r[1] - r[2]}

    # -- detector state ----------------------------------------------------------------
    def save_detector(self, blob: bytes | memoryview, now: datetime, *, ingest_seq: int | None = None) -> None:
        """``ingest_seq``: the engine's ingest log holds every batch after it (None: unchanged)."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO detector_state (id, saved_at, blob, ingest_seq) VALUES (1, ?, ?, COALESCE(?, 0))"
                " ON CONFLICT(id) DO UPDATE SET saved_at = excluded.saved_at, blob = excluded.blob,"
                " ingest_seq = COALESCE(?, ingest_seq)",
                (_iso(now), blob, ingest_seq, ingest_seq),
            )

    def load_detector(self) -> bytes | None:
        r = self._db.execute("SELECT blob FROM detector_state WHERE id = 1").fetchone()
        return bytes(r[0]) if r else None

    def ingest_seq(self) -> int:
        """The last ingest-log sequence number the saved detector state contains (0: none)."""
        r = self._db.execute("SELECT ingest_seq FROM detector_state WHERE id = 1").fetchone()
        return int(r[0]) if r else 0

    def complete_detector_save(self, complete_seq: int, chunk_users: int, now: datetime, *, drop_single_blob: bool = False) -> None:
        """Every detector chunk dirty at ``complete_seq`` is stored: a restart replays from there."""
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO detector_save (id, saved_at, complete_seq, chunk_users) VALUES (1, ?, ?, ?)",
                (_iso(now), complete_seq, chunk_users),
            )
            if drop_single_blob:
                self._db.execute("DELETE FROM detector_state")

    def detector_save(self) -> tuple[int, int] | None:
        """``(complete_seq, chunk_users)`` of the last complete chunked save (None: none yet)."""
        r = self._db.execute("SELECT complete_seq, chunk_users FROM detector_save WHERE id = 1").fetchone()
        return (int(r[0]), int(r[1])) if r else None

    # -- erasure -----------------------------------------------------------------------
    def erase(self, user: str, now: datetime) -> int:
        """Remove the user's alerts, deliveries and lifecycle events; keep an identity-free tombstone."""
        with self.transaction():
            n = self._db.execute(
                "DELETE FROM deliveries WHERE alert_id IN (SELECT alert_id FROM alerts WHERE user = ?)", (user,)
            ).rowcount
            n += self._db.execute("DELETE FROM alert_events WHERE user = ?", (user,)).rowcount
            n += self._db.execute("DELETE FROM alerts WHERE user = ?", (user,)).rowcount
            if n:
                self._db.execute(
                    "INSERT INTO erasure_tombstones (at, store, rows_removed) VALUES (?, 'alerts', ?)", (_iso(now), n)
                )
        return n
