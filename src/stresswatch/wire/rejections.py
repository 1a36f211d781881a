"""Refused wire messages: counted by (kind, reason), logged at most once per reason per interval.

A client that floods the engine with bad messages must not flood its log: the first refusal
of a (kind, reason) in an interval is logged at once; the rest of that interval are only
counted and reported, as one line with their number, with the next refusal after the
interval (or at :meth:`Rejections.flush`). A log line names the message kind, the reason
code, the field and the rule, and the topic's user when it is a valid id (a pseudonymous
account name); never a value from the payload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ParseError, WireError
from .ids import is_valid_id


@dataclass
class _Window:
    started: float
    suppressed: int = 0


@dataclass
class Rejections:
    """Thread-safe: the ingest receiver (paho's thread) and the engine thread share one."""

    log: logging.Logger = field(default_factory=lambda: logging.getLogger("stresswatch.wire"))
    interval_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, error: ParseError | str, *, user: str | None = None, field_name: str | None = None) -> None:
        """Count one refused ``kind`` message (``ingest``, ``consent``, ``ack``, ``checkin``...);
        ``error`` is the decoder's :class:`WireError` (another ``ParseError`` counts as
        ``malformed``) or a reason code with ``field_name``."""
        if isinstance(error, ParseError):
            reason = error.reason if isinstance(error, WireError) else "malformed"
            fld, rule = error.field, error.message
        else:
            reason, fld, rule = error, field_name, None
        key = (kind, reason)
        now = self.clock()
        with self._lock:
            self._counts[key] += 1
            win = self._windows.get(key)
            if win is not None and now - win.started < self.interval_s:
                win.suppressed += 1
                return
            self._windows[key] = _Window(now)
        who = f" from user {user!r}" if user is not None and is_valid_id(user) else ""
        where = f" field {fld!r}" if fld else ""
        more = f"; {win.suppressed} more {kind} message(s) refused for this reason in the last {now - win.started:.0f} s" if win and win.suppressed else ""
        self.log.warning("refused a %s message%s (%s):%s %s%s", kind, who, reason, where, rule or "", more)

    def flush(self) -> None:
        """Report what was counted but not yet logged (at shutdown)."""
        now = self.clock()
        with self._lock:
            pending = [(k, w.suppressed, w.started) for k, w in self._windows.items() if w.suppressed]
            for k, _, _ in pending:
                self._windows[k].suppressed = 0
        for (kind, reason), n, started in pending:
            self.log.warning("%d more %s message(s) refused (%s) in the last %.0f s", n, kind, reason, now - started)

    def counts(self) -> dict[tuple[str, str], int]:
        """Refusals since start, by (kind, reason)."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
