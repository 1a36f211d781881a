"""The consent ledger: an append-only SQLite table, the source of truth for consent.

Rows are never updated (a trigger refuses it); the current state is derived by
:func:`stresswatch.consent.state.fold`. Each append is one transaction.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConsentError, StorageError
from .state import Action, ConsentEvent, ConsentState, Visibility, fold

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
"""


def new_pseudonym() -> str:
    return "peer-" + secrets.token_hex(3)


class ConsentLedger:
    """SQLite-backed ledger. Open one per thread; the file may be shared across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open consent ledger: {exc}", path=self.path) from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ConsentLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, event: ConsentEvent) -> ConsentEvent:
        with self._db:
            cur = self._db.execute(
                "INSERT INTO consent_events (user, action, at, via, text_version, recipients, visibility, display_name)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event.user,
                    event.action.value,
                    event.at.astimezone(timezone.utc).isoformat(),
                    event.via,
                    event.text_version,
                    json.dumps(list(event.recipients)),
                    event.visibility.value,
                    event.display_name,
                ),
            )
        return ConsentEvent(**{**event.__dict__, "seq": cur.lastrowid})

    def events(self, user: str) -> list[ConsentEvent]:
        rows = self._db.execute(
            "SELECT seq, user, action, at, via, text_version, recipients, visibility, display_name"
            " FROM consent_events WHERE user = ? ORDER BY seq",
            (user,),
        ).fetchall()
        return [
            ConsentEvent(
                seq=r[0],
                user=r[1],
                action=Action(r[2]),
                at=datetime.fromisoformat(r[3]),
                via=r[4],
                text_version=r[5],
                recipients=tuple(json.loads(r[6])),
                visibility=Visibility(r[7]),
                display_name=r[8],
            )
            for r in rows
        ]

    def state(self, user: str) -> ConsentState:
        return fold(user, self.events(user))

    def users(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT user FROM consent_events ORDER BY user")]

    # -- the companion's verbs: each one line for the user, each one append --------------
    def grant(
        self,
        user: str,
        recipients: list[str] | tuple[str, ...],
        *,
        now: datetime,
        visibility: Visibility = Visibility.REACH_OUT,
        display_name: str | None = None,
        via: str = "cli",
    ) -> ConsentState:
        if not recipients:
            raise ConsentError("name at least one worker or group who may be alerted", user=user)
        previous = self.state(user)
        self.append(
            ConsentEvent(
                user,
                Action.GRANT,
                now,
                via,
                recipients=tuple(recipients),
                visibility=visibility,
                display_name=display_name or previous.display_name or new_pseudonym(),
            )
        )
        return self.state(user)

    def revoke(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        self.append(ConsentEvent(user, Action.REVOKE, now, via))
        return self.state(user)

    def pause(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        self.append(ConsentEvent(user, Action.PAUSE, now, via))
        return self.state(user)

    def resume(self, user: str, *, now: datetime, via: str = "cli") -> ConsentState:
        self.append(ConsentEvent(user, Action.RESUME, now, via))
        return self.state(user)
