"""Per-user consent for the engine's hot path: two array columns, not a state object per user."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import numpy as np

from ..consent.ledger import ConsentLedger
from ..consent.state import ConsentEvent, ConsentState, Status, fold
from .user_index import Column, UserIndex

_UNKNOWN = 0  # not read from the ledger yet (or dropped)
_CODES = {status: code for code, status in enumerate(Status, start=1)}
_PROCESSING_CODES = (_CODES[Status.ACTIVE], _CODES[Status.PAUSED])  # allows_processing: active or paused
_PROCESSING = np.array(_PROCESSING_CODES, np.int8)
_NO_EXPIRY = np.iinfo(np.int64).max
_STATUS_OF = {code: status for status, code in _CODES.items()}


def _ns(t: datetime) -> int:
    return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1_000


def _at(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc) + timedelta(microseconds=ns % 1_000_000_000 // 1_000)


class ConsentCache:
    """What the engine's hot path needs of ``ledger.state(user)``, per user: the status (int8),
    the expiry (int64 ns) and the time zone (int16 code into the zones seen), indexed by the
    engine's user numbers; 11 bytes a user where a cached state object cost about 200-400. A ledger read per ingest batch was a fifth of the
    engine's time. Consent that reaches the engine (its consent topic, an erasure) drops the
    entry at once; the status sweep refreshes the entries it visits, so a ledger written by
    another process is seen within one sweep."""

    def __init__(self, ledger: ConsentLedger, users: UserIndex | None = None) -> None:
        self._ledger = ledger
        self.users = users if users is not None else UserIndex()
        self._status = Column(np.int8, _UNKNOWN)
        self._expires_ns = Column(np.int64, _NO_EXPIRY)
        self._zone = Column(np.int16, 0)
        self._zones: list[str | None] = [None]  # code -> zone name (0: none given)
        self._zone_codes: dict[str | None, int] = {None: 0}
        self._loading: set[str] | None = None  # users whose entry changed since a bulk read began

    def _fresh(self, state: ConsentState) -> int:
        """Keep a state read from the ledger now (fresher than any bulk read in progress)."""
        if self._loading is not None:
            self._loading.add(state.user)
        return self._keep(state)

    def _keep(self, state: ConsentState) -> int:
        i = self.users.number(state.user)
        n = len(self.users)
        self._status.ensure(n)[i] = _CODES[state.status]
        self._expires_ns.ensure(n)[i] = _ns(state.expires_at) if state.expires_at is not None else _NO_EXPIRY
        code = self._zone_codes.get(state.timezone)
        if code is None:
            code = self._zone_codes[state.timezone] = len(self._zones)
            self._zones.append(state.timezone)
        self._zone.ensure(n)[i] = code
        return i

    def begin_load(self) -> None:
        """A bulk read of the ledger begins (on another thread, :meth:`load` applies it in
        slices): entries changed from now on are newer than it and are not overwritten."""
        self._loading = set()

    def end_load(self) -> None:
        self._loading = None

    def load(self, states: Iterable[ConsentState]) -> list[str]:
        """Fill the cache from states read in bulk (engine start); returns their users. An
        entry changed since :meth:`begin_load` (a consent message, a fresh read) is kept."""
        skip = self._loading or ()
        return [self.users.names[self._keep(st)] for st in states if st.user not in skip]

    def refresh(self, user: str, events: list[ConsentEvent] | None = None) -> ConsentState:
        """Read the ledger now (or fold ``events``, the user's history just read with
        :meth:`histories`); returns the full state (with history) and caches it."""
        st = self._ledger.state(user) if events is None else fold(user, events)
        self._fresh(st)
        return st

    def histories(self, users: list[str]) -> dict[str, list[ConsentEvent]]:
        """The ledger's events of ``users``, read in bulk (give each to :meth:`refresh`)."""
        return self._ledger.events_of(users)

    def _cached(self, user: str) -> int:
        i = self.users.get(user)
        if i is None or i >= len(self._status.values) or self._status.values[i] == _UNKNOWN:
            i = self._fresh(self._ledger.state(user))
        return i

    def state(self, user: str) -> ConsentState:
        """The user's consent as cached: status, expiry and time zone only (recipients,
        visibility and the history are not kept: the gate reads the ledger at send time)."""
        i = self._cached(user)
        exp = int(self._expires_ns.values[i])
        return ConsentState(
            user,
            _STATUS_OF[int(self._status.values[i])],
            expires_at=None if exp == _NO_EXPIRY else _at(exp),
            timezone=self._zones[int(self._zone.values[i])],
        )

    def may_process(self, user: str, now: datetime) -> bool:
        i = self._cached(user)
        return int(self._status.values[i]) in _PROCESSING_CODES and _ns(now) < int(self._expires_ns.values[i])

    def paused(self, user: str) -> bool:
        """The consent is paused (alerts stop; processing goes on), as cached."""
        return int(self._status.values[self._cached(user)]) == _CODES[Status.PAUSED]

    def processing_users(self, users: list[str], now: datetime) -> np.ndarray:
        """``may_process`` for many users at once (a bool array); users not cached are read."""
        idx = np.fromiter((self.users.number(u) for u in users), np.int64, len(users))
        status = self._status.ensure(len(self.users))
        for k in np.flatnonzero(status[idx] == _UNKNOWN).tolist():
            self._fresh(self._ledger.state(users[k]))
        status, expires = self._status.values[idx], self._expires_ns.values[idx]
        return np.isin(status, _PROCESSING) & (_ns(now) < expires)

    def drop(self, user: str) -> None:
        if self._loading is not None:
            self._loading.add(user)
        i = self.users.get(user)
        if i is not None and i < len(self._status.values):
            self._status.values[i] = _UNKNOWN


__all__ = ["ConsentCache"]
