"""Write-ahead log of accepted ingest batches: a batch is acknowledged (PUBACK) only once it
is on disk.

The receiver hands each accepted payload to :meth:`IngestLog.append` (paho's thread, no
I/O there); the log's own thread writes everything queued, ``fdatasync``s once for the
group, and only then calls ``on_durable`` with the group, which acknowledges each message
to the broker and gives the batches to the engine. Every record carries a sequence number;
a state snapshot records the last sequence it contains, so after a crash the engine
restores the snapshot and replays the records after it (:meth:`IngestLog.recover`), and a
snapshot lets the log delete the segments it covers (:meth:`IngestLog.truncate_through`).

Segment file: records ``<seq u64><user_len u32><payload_len u32><crc32 u32>`` + user + payload.
A torn or corrupt tail (a crash mid-write) ends the segment's records; it was never
acknowledged, so the broker delivers it again.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..fsio import atomic_writer, fsync_dir
from ..private_files import private_dir

log = logging.getLogger("stresswatch.engine")

_HEAD = struct.Struct("<QIII")
_SUFFIX = ".log"


@dataclass(slots=True)
class LogEntry:
    """One accepted message. ``payload`` None: nothing to write (a duplicate, acknowledged
    after the next sync so that its original is durable first). ``ref`` is the caller's."""

    user: str
    payload: bytes | None
    ref: object
    seq: int = 0


@dataclass(frozen=True)
class LoggedBatch:
    seq: int
    user: str
    payload: bytes


def read_segment(path: Path) -> Iterator[LoggedBatch]:
    """The segment's intact records, in order (stops at a torn or corrupt tail)."""
    data = path.read_bytes()
    at = 0
    while at + _HEAD.size <= len(data):
        seq, ulen, plen, crc = _HEAD.unpack_from(data, at)
        body = data[at + _HEAD.size : at + _HEAD.size + ulen + plen]
        if len(body) < ulen + plen or zlib.crc32(body) != crc:
            return
        try:
            user = body[:ulen].decode()
        except UnicodeDecodeError:
            return
        yield LoggedBatch(seq, user, bytes(body[ulen:]))
        at += _HEAD.size + ulen + plen


class IngestLog:
    def __init__(self, folder: Path, on_durable: Callable[[list[LogEntry]], None], *, fsync: bool = True) -> None:
        """``fsync`` False only for measurements (the figure of what durability costs)."""
        self.folder = folder
        self._on_durable = on_durable
        self._fsync = fsync
        self._queue: queue.SimpleQueue[LogEntry | str | tuple[str, str] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._segments: dict[Path, int] = {}  # closed or open segment -> last seq written (0: none)
        self._next_seq = 1
        self._file: object | None = None
        self._path: Path | None = None
        self._thread: threading.Thread | None = None
        self.synced_groups = 0
        self.records = 0
        self.failed: Exception | None = None

    # -- restart -----------------------------------------------------------------------
    def recover(self, after_seq: int) -> Iterator[LoggedBatch]:
        """Records with ``seq > after_seq``, oldest first (before :meth:`start`)."""
        private_dir(self.folder)
        for path in sorted(self.folder.glob(f"*{_SUFFIX}")):
            last = 0
            for rec in read_segment(path):
                last = rec.seq
                self._next_seq = max(self._next_seq, rec.seq + 1)
                if rec.seq > after_seq:
                    yield rec
            with self._lock:
                self._segments[path] = last

    # -- writing -----------------------------------------------------------------------
    def start(self) -> None:
        private_dir(self.folder)
        if not self._segments:  # recover() not called: still never reuse a sequence number
            for _ in self.recover(after_seq=2**63):
                pass
        self._open_segment()
        self._thread = threading.Thread(target=self._run, name="ingest-log", daemon=True)
        self._thread.start()

    def append(self, entry: LogEntry) -> None:
        """Any thread; ``on_durable`` gets the entry once it is on disk."""
        self._queue.put(entry)

    def rotate(self) -> None:
        """New records go to a new segment (so that a snapshot can delete the old one whole)."""
        self._queue.put("rotate")

    def erase(self, user: str) -> None:
        """Erasure: rewrite every segment without ``user``'s records (on the log's thread,
        after what is queued; new records go to a new segment)."""
        self._queue.put(("erase", user))

    def truncate_through(self, seq: int) -> int:
        """Delete closed segments whose records all have ``seq`` at most ``seq`` (a snapshot
        holds them); returns how many. Any thread."""
        with self._lock:
            done = [p for p, last in self._segments.items() if p != self._path and last <= seq]
            for p in done:
                p.unlink(missing_ok=True)
                del self._segments[p]
        return len(done)

    def close(self) -> None:
        """Write and sync what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
            self._file = None

    def _open_segment(self) -> None:
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
        n = max((int(p.stem) for p in self._segments if p.stem.isdigit()), default=0) + 1
        self._path = self.folder / f"{n:010d}{_SUFFIX}"
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)
        if self._fsync:
            fsync_dir(self.folder)  # the new name survives a crash too
        with self._lock:
            self._segments[self._path] = 0

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            items = [first]
            while True:  # a group: everything queued meanwhile, one sync
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            group: list[LogEntry] = []
            for item in items:
                if item is None:
                    stop = True
                elif item == "rotate":
                    self._write(group)  # what came before the rotation stays in the old segment
                    group = []
                    self._open_segment()
                elif isinstance(item, tuple):
                    self._write(group)
                    group = []
                    self._open_segment()
                    self._rewrite_without(item[1])
                elif isinstance(item, LogEntry):
                    group.append(item)
            self._write(group)

    def _rewrite_without(self, user: str) -> None:
        with self._lock:
            closed = [p for p in self._segments if p != self._path]
        for path in closed:
            # Under the lock: a snapshot's truncate_through (another thread) may otherwise delete
            # the segment between listing and reading it (the log's thread died of the
            # FileNotFoundError) or after reading it (the rewrite brought a deleted segment back).
            with self._lock:
                if path not in self._segments:
                    continue  # truncated meanwhile: the user's records went with it
                try:
                    recs = list(read_segment(path))
                    if not any(r.user == user for r in recs):
                        continue
                    with atomic_writer(path, mode=0o600, binary=True) as f:
                        for r in recs:
                            if r.user != user:
                                u = r.user.encode()
                                f.write(_HEAD.pack(r.seq, len(u), len(r.payload), zlib.crc32(u + r.payload)) + u + r.payload)
                except OSError as exc:  # the log keeps acknowledging everyone else; said loudly
                    self.failed = exc
                    log.error("ingest log: erasing a user's records from a segment failed (%s)", exc.strerror)

    def _write(self, group: list[LogEntry]) -> None:
        if not group:
            return
        chunks: list[bytes] = []
        last = 0
        for e in group:
            if e.payload is None:
                continue
            e.seq = last = self._next_seq
            self._next_seq += 1
            user = e.user.encode()
            body = user + e.payload
            chunks.append(_HEAD.pack(e.seq, len(user), len(e.payload), zlib.crc32(body)))
            chunks.append(body)
        try:
            if chunks:
                self._file.write(b"".join(chunks))  # type: ignore[attr-defined]
                if self._fsync:
                    os.fdatasync(self._file.fileno())  # type: ignore[attr-defined]
                with self._lock:
                    assert self._path is not None
                    self._segments[self._path] = last
                self.records += len(chunks) // 2
            self.synced_groups += 1
        except OSError as exc:  # not acknowledged: the broker keeps the messages for a redelivery
            self.failed = exc
            log.error("ingest log: cannot write (%s): %d message(s) not acknowledged", exc.strerror, len(group))
            return
        try:
            self._on_durable(group)
        except Exception:  # noqa: BLE001 - the log must keep writing for everyone else
            log.exception("ingest log: handing %d durable message(s) on failed", len(group))


__all__ = ["IngestLog", "LogEntry", "LoggedBatch", "read_segment"]
