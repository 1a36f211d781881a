"""The consent ledger: an append-only SQLite table, the source of truth for consent.

Rows are never updated or deleted (triggers refuse both); the current state is derived by
:func:`stresswatch.consent.state.fold`. Each append is one transaction and idempotent on
the event's ``event_id``, so the same event arriving twice (the retained consent topic is
re-delivered on every engine start) is stored once.

The one exception to "never deleted" is the right to erasure (GDPR art. 17), which overrides
the ledger's append-only rule: :meth:`ConsentLedger.erase` removes every row of the user and
leaves an identity-free tombstone (when, how many rows). See docs/CONSENT.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from .. import sqlite
from ..errors import ConsentError, StorageError
from ..wire.ids import is_valid_id
from .state import Action, ConsentEvent, ConsentState, QuietHours, Visibility, check_zone, decide_change, fold

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS consent_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    user         TEXT NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ('grant', 'pause', 'resume', 'revoke')),
    at           TEXT NOT NULL,
    via          TEXT NOT NULL,
    text_version TEXT NOT NULL,
    recipients   TEXT NOT NULL,
    visibility   TEXT NOT NULL,
    display_name TEXT
);
CREATE INDEX IF NOT EXISTS consent_events_user ON consent_events(user, seq);
CREATE TRIGGER IF NOT EXISTS consent_events_append_only
BEFORE UPDATE ON consent_events BEGIN SELECT RAISE(ABORT, 'consent ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS erasure_permit (user TEXT PRIMARY KEY);
CREATE TRIGGER IF NOT EXISTS consent_events_no_delete
BEFORE DELETE ON consent_events WHEN NOT EXISTS (SELECT 1 FROM erasure_permit WHERE user = OLD.user)
BEGIN SELECT RAISE(ABORT, 'consent ledger is append-only (only erasure removes rows)'); END;
CREATE TABLE IF NOT EXISTS erasure_tombstones (
    at           TEXT NOT NULL,
    store        TEXT NOT NULL,
    rows_removed INTEGER NOT NULL
);
"""
# Columns added after the first release: added in place to older files.
_ADDED_COLUMNS = {
    "event_id": "TEXT",
    "quiet_hours": "TEXT",
    "expires_at": "TEXT",
    "timezone": "TEXT",
}
IN_CHUNK = 500  # users per query of a bulk read (below SQLite's oldest limit of 999 parameters)
_COLUMNS = "seq, user, action, at, via, text_version, recipients, visibility, display_name, event_id, quiet_hours, expires_at, timezone"


def new_pseudonym() -> str:
    return "peer-" + secrets.token_hex(3)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(timezone.utc).isoformat() if t is not None else None


class ConsentLedger:
    """SQLite-backed ledger. Open one per thread; the file may be shared across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Stored rows that could not be read back (skipped) or recipients that are not valid ids
        # (dropped from their grant), by row seq: reported once each, never a crash.
        self.skipped: dict[int, str] = {}
        try:
            self._db = sqlite.connect(self.path)
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(consent_events)")}
            for name, kind in _ADDED_COLUMNS.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE consent_events ADD COLUMN {name} {kind}")
            self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS consent_events_event_id ON consent_events(event_id)")
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open consent ledger: {exc}", path=self.path) from None

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One SQLite transaction; nested calls join the outer one (see :mod:`stresswatch.sqlite`)."""
        return sqlite.transaction(self._db)

    def __enter__(self) -> ConsentLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, event: ConsentEvent) -> ConsentEvent:
        """Store ``event`` once: an event whose ``event_id`` is already stored is not stored again."""
        try:
            at, expires_at = _iso(event.at), _iso(event.expires_at)
        except (OverflowError, ValueError):
            raise ConsentError("a consent time is out of range (years 2000-2200)", user=event.user) from None
        try:
            with self.transaction():
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO consent_events (user, action, at, via, text_version, recipients, visibility,"
                    " display_name, event_id, quiet_hours, expires_at, timezone) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.user,
                        event.action.value,
                        at,
                        event.via,
                        event.text_version,
                        json.dumps(list(event.recipients)),
                        event.visibility.value,
                        event.display_name,
                        event.event_id,
                        event.quiet_hours.encode() if event.quiet_hours else None,
                        expires_at,
                        event.timezone,
                    ),
                )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot append consent event: {exc}", path=self.path) from None
        return ConsentEvent(**{**event.__dict__, "seq": cur.lastrowid if cur.rowcount else None})

    def extend(self, events: list[ConsentEvent]) -> int:
        """Append events received from elsewhere (the consent topic); returns how many were new."""
        return sum(1 for ev in events if self.append(ev).seq is not None)

    def events(self, user: str) -> list[ConsentEvent]:
        """The user's events in order. A stored row that cannot be read back (written by an older
        version, or by hand) is skipped, and a recipient that is not a valid id is dropped from
        its grant; each is logged once and kept in :attr:`skipped`. Skipping fails safe: a grant
        that is not read alerts no one."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM consent_events WHERE user = ? ORDER BY seq", (user,)).fetchall()
        return [ev for ev in map(self._event, rows) if ev is not None]

    def events_of(self, users: list[str]) -> dict[str, list[ConsentEvent]]:
        """:meth:`events` of many users (every one of ``users`` is a key), read in one query
        per :data:`IN_CHUNK` users instead of one per user (the engine's status sweep)."""
        out: dict[str, list[ConsentEvent]] = {u: [] for u in users}
        for k in range(0, len(users), IN_CHUNK):
            part = users[k : k + IN_CHUNK]
            marks = ",".join("?" * len(part))
            for row in self._db.execute(f"SELECT {_COLUMNS} FROM consent_events WHERE user IN ({marks}) ORDER BY user, seq", part):
                ev = self._event(row)
                if ev is not None:
                    out[row[1]].append(ev)
        return out

    def iter_states(self) -> Iterator[ConsentState]:
        """Every user's state, by user, read in one query and folded as the rows stream (engine
        start: one read per user cost seconds at 100,000 users); rows are read back as
        :meth:`events` reads them, and each state holds its history."""
        user: str | None = None
        events: list[ConsentEvent] = []
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM consent_events ORDER BY user, seq"):
            if row[1] != user:
                if user is not None:
                    yield fold(user, events)
                user, events = row[1], []
            ev = self._event(row)
            if ev is not None:
                events.append(ev)
        if user is not None:
            yield fold(user, events)

    def _event(self, r: tuple) -> ConsentEvent | None:  # type: ignore[type-arg]
        user = r[1]
        try:
            recipients = json.loads(r[6])
            if not isinstance(recipients, list):
                raise TypeError("recipients is not a list")
            valid = tuple(x for x in recipients if is_valid_id(x))
            if len(valid) != len(recipients):
                self._report(r[0], user, "recipient(s) that are not valid ids dropped")
            at = datetime.fromisoformat(r[3])
            expires_at = datetime.fromisoformat(r[11]) if r[11] else None
            if at.tzinfo is None or (expires_at is not None and expires_at.tzinfo is None):
                raise ValueError("a time without a time zone")
            return ConsentEvent(
                seq=r[0],
                user=r[1],
                action=Action(r[2]),
                at=at,
                via=r[4],
                text_version=r[5],
                recipients=valid,
                visibility=Visibility(r[7]),
                display_name=r[8],
                event_id=r[9] or f"legacy-{r[0]}",
                quiet_hours=QuietHours.decode(r[10]),
                expires_at=expires_at,
                timezone=check_zone(r[12]) if r[12] else None,
            )
        except (ValueError, TypeError, OverflowError, ConsentError) as exc:  # JSONDecodeError is a ValueError
            self._report(r[0], user, f"skipped ({type(exc).__name__})")
            return None

    def _report(self, seq: int, user: str, what: str) -> None:
        if seq not in self.skipped:
            self.skipped[seq] = what
            log.warning("consent ledger %s: stored event %d of user %r: %s", self.path.name, seq, user, what)

    def state(self, user: str) -> ConsentState:
        return fold(user, self.events(user))

    def users(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT user FROM consent_events ORDER BY user")]

    def erase(self, user: str, *, now: datetime) -> int:
        """Right to erasure: remove every row of ``user``; keep only an identity-free tombstone."""
        try:
            with self.transaction():
                self._db.execute("INSERT OR IGNORE INTO erasure_permit (user) VALUES (?)", (user,))
                n = self._db.execute("DELETE FROM consent_events WHERE user = ?", (user,)).rowcount
                self._db.execute("DELETE FROM erasure_permit WHERE user = ?", (user,))
                if n:
                    self._db.execute(
                        "INSERT INTO erasure_tombstones (at, store, rows_removed) VALUES (?, 'consent_events', ?)", (_iso(now), n)
                    )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot erase consent rows: {exc}", path=self.path) from None
        return n

    # -- the companion's verbs: each one line for the user, each one append --------------
    def grant(
        self,
        user: str,
        recipients: list[str] | tuple[str, ...],
        *,
        now: datetime,
        visibility: Visibility = Visibility.REACH_OUT,
        display_name: str | None = None,
        quiet_hours: QuietHours | None = None,
        expires_at: datetime | None = None,
        via: str = "cli",
        timezone: str | None = None,
    ) -> ConsentState:
        """Record a grant. ``timezone``: the person's own IANA zone (their time-of-day
        baselines follow it; a later grant with another zone moves them, e.g. after travel)."""
        if not recipients:
            raise ConsentError("name at least one worker or group who may be alerted", user=user)
        if expires_at is not None and expires_at <= now:
            raise ConsentError("the expiry must be in the future", user=user)
        previous = self.state(user)
        self.append(
            ConsentEvent(
                user,
                Action.GRANT,
                now,
                via,
                recipients=tuple(dict.fromkeys(recipients)),
                visibility=visibility,
                display_name=display_name or previous.display_name or new_pseudonym(),
                quiet_hours=quiet_hours,
                expires_at=expires_at,
                timezone=check_zone(timezone) if timezone else None,
            )
        )
        return self.state(user)

    def _change(self, user: str, action: Action, now: datetime, via: str) -> ConsentState:
        """Append ``action`` if it changes something (:func:`decide_change`); else
        :class:`ConsentError` with the reason, and nothing is written."""
        with self.transaction():  # the state read and the append see the same ledger
            decision = decide_change(self.state(user), action, now)
            if not decision.allowed:
                raise ConsentError(decision.reason, user=user)
            self.append(ConsentEvent(user, action, now, via))
        return self.state(user)

    def revoke(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        return self._change(user, Action.REVOKE, now, via)

    def pause(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        return self._change(user, Action.PAUSE, now, via)

    def resume(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        return self._change(user, Action.RESUME, now, via)
