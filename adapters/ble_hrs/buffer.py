"""The companion's durable buffer: encoded ingest batches in SQLite until the broker's PUBACK.

A batch is committed here (WAL, ``synchronous=FULL``) before it is handed to MQTT and deleted
only when the broker acknowledged it, so a broker outage, a lost connection or a killed
companion loses nothing; a batch re-sent after a crash keeps its ``stream_id``/``seq`` and the
engine's :class:`~stresswatch.ingest.Deduplicator` drops the copy. Gaps (disconnects, contact
loss) are kept here too, for the user's own record.

Size on disk is bounded only by the outage length: about 1 kB per 10 s batch of one strap
(~9 MB per day offline).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from stresswatch.errors import StorageError
from stresswatch.sqlite import connect as sqlite_connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    n_samples INTEGER NOT NULL,
    PRIMARY KEY (stream_id, seq)
);
CREATE TABLE IF NOT EXISTS gaps (
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (start_ns, reason)
);
"""


@dataclass(frozen=True)
class Pending:
    stream_id: str
    seq: int
    topic: str
    payload: bytes


class StreamBuffer:
    """The companion's ingest batches until the broker acknowledged them (named apart from the
    engine's alert :class:`stresswatch.alerts.outbox.Outbox`). Thread-safe: paho acknowledges
    on its own thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite_connect(self.path, "synchronous=FULL", any_thread=True)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the stream buffer: {exc}", path=self.path) from None
        self._lock = threading.Lock()

    def add(self, stream_id: str, seq: int, topic: str, payload: bytes, n_samples: int) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO outbox (stream_id, seq, topic, payload, n_samples) VALUES (?, ?, ?, ?, ?)",
                    (stream_id, seq, topic, payload, n_samples),
                )
            except sqlite3.Error as exc:
                raise StorageError(f"cannot buffer a batch: {exc}", path=self.path) from None

    def remove(self, stream_id: str, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE stream_id = ? AND seq = ?", (stream_id, seq))

    def pending(self, limit: int = 1000, exclude: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset()) -> list[Pending]:
        """Oldest first (rowid order = order added), skipping ``exclude`` (already handed to MQTT)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT stream_id, seq, topic, payload FROM outbox ORDER BY rowid LIMIT ?", (limit + len(exclude),)
            ).fetchall()
        out = [Pending(s, q, t, bytes(p)) for s, q, t, p in rows if (s, q) not in exclude]
        return out[:limit]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def add_gap(self, start_ns: int, end_ns: int, reason: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO gaps VALUES (?, ?, ?)", (start_ns, end_ns, reason))

    def gaps(self) -> list[tuple[int, int, str]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute("SELECT start_ns, end_ns, reason FROM gaps ORDER BY start_ns")]  # type: ignore[misc]

    def close(self) -> None:
        with self._lock:
            self._db.close()
