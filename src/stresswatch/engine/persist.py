"""Saving the engine's state: samples in bulk and the detector snapshot, off the engine thread.

* **Samples** (``engine.keep_samples``): the engine thread only hands each flush's frame to a
  :class:`SampleWriter`; its own thread writes everything pending every ``interval_s`` (or
  sooner once ``max_rows`` are waiting) as one :meth:`SampleStore.append` (one Parquet file
  per UTC day, all users together) and merges the store's small files in the background.
  The cost is the rows, never the number of users: a per-user append on the engine thread
  (6-8 ms a user) stalled the engine for minutes per save at 100,000 users.
* **Detector snapshot**: the engine thread only copies the detector's arrays
  (:meth:`Detector.state_arrays`, a memory copy); serialising them and the SQLite write of
  the blob run on a snapshot thread with its own connection unless ``wait``. Serialising on
  the engine thread held it about 1-3 s a save at 100,000 users. The snapshot is committed
  only after every sample handed over before it is durable, so it never covers ingest-log
  records whose samples could still be lost; ``then`` (the log's truncation) runs after both.

One snapshot at a time, in order; erasure and shutdown wait for it (:meth:`StatePersister.join`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from ..alerts.outbox import Outbox
from ..detect.detector import serialise_state
from ..errors import StresswatchError
from ..store import SampleStore

log = logging.getLogger("stresswatch.engine")
_NO_LOCK = contextlib.nullcontext()


class SampleWriter:
    """Pending samples and the thread that appends them to the store (see the module doc).

    ``add`` and ``drop_user`` are for the engine thread; ``sync`` for any thread. A write that
    fails (a full disk) keeps its rows pending and is tried again: ``sync`` then reports
    False, so no snapshot is committed past rows that are not on disk.
    """

    def __init__(
        self,
        store: SampleStore,
        *,
        interval_s: float = 5.0,
        max_rows: int = 1_000_000,
        compact_every_s: float = 600.0,
        today: Callable[[], date] | None = None,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self.max_rows = max_rows
        self.compact_every_s = compact_every_s
        self._today = today
        self._cond = threading.Condition()
        self._in_flight = threading.Lock()  # held from taking pending rows until they are stored
        self._attempts = 0
        self._pending: list[pl.DataFrame] = []
        self._rows = 0
        self._queued = 0  # frames handed over so far (a frame's number is its token)
        self._written = 0  # frames durable so far
        self._failing = False
        self._stop = False
        self._urgent = False
        self._thread: threading.Thread | None = None
        self._compacted_at = time.monotonic()
        self.rows_written = 0
        self.files_written = 0
        self.last_write_s = 0.0

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            return
        with self._cond:
            self._pending.append(frame)
            self._rows += frame.height
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sample-writer", daemon=True)
                self._thread.start()
            if self._rows >= self.max_rows:
                self._urgent = True
                self._cond.notify_all()

    def drop_user(self, user: str, *, settle: bool = False) -> None:
        """Forget ``user``'s rows not written yet. ``settle`` (erasure): first wait for a write
        in flight, so that every row of the user is either dropped here or already in the
        store, where the erasure that follows finds it."""
        with self._in_flight if settle else _NO_LOCK, self._cond:
            self._pending = [f.filter(pl.col("user") != user) for f in self._pending]
            self._rows = sum(f.height for f in self._pending)

    @property
    def pending_rows(self) -> int:
        return self._rows

    def sync(self, timeout_s: float | None = None) -> bool:
        """Write everything handed over before this call; True once it is durable (False:
        the write failed, or ``timeout_s`` passed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            token, attempts = self._queued, self._attempts
            if self._written >= token:
                return True
            self._urgent = True
            self._cond.notify_all()
            while self._written < token:
                if self._failing and self._attempts > attempts:
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> bool:
        """Write what is pending and stop the thread; True if everything is durable."""
        ok = self.sync()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        return ok

    def _run(self) -> None:
        while True:
            with self._cond:
                if not (self._urgent or self._stop):
                    self._cond.wait(self.interval_s)
                stop = self._stop
            with self._in_flight:
                with self._cond:
                    self._urgent = False
                    frames, token = self._pending, self._queued
                    self._pending, self._rows = [], 0
                if frames:
                    self._write(frames, token)
            if stop:
                return  # close() synced first: what is left failed to write and stays in the log
            if time.monotonic() - self._compacted_at >= self.compact_every_s:
                self._compacted_at = time.monotonic()
                try:
                    self.store.compact(today=self._today() if self._today else None)
                except StresswatchError as exc:  # the files stay as they were; merged next time
                    log.warning("merging stored samples: %s", exc)

    def _write(self, frames: list[pl.DataFrame], token: int) -> None:
        t = time.monotonic()
        try:
            frame = pl.concat(frames, how="vertical")
            self.store.append(frame)
        except StresswatchError as exc:
            log.warning("storing samples: %s (kept, tried again)", exc)
            with self._cond:
                self._pending[:0] = frames
                self._rows = sum(f.height for f in self._pending)
                self._failing = True
                self._attempts += 1
                self._cond.notify_all()
            return
        with self._cond:
            self._written = max(self._written, token)
            self._failing = False
            self._attempts += 1
            self._cond.notify_all()
        self.rows_written += frame.height
        self.files_written += 1
        self.last_write_s = time.monotonic() - t


class StatePersister:
    def __init__(self, db_path: Path, outbox: Outbox, store: SampleStore | None, *, today: Callable[[], date] | None = None) -> None:
        """``outbox``: the engine thread's connection (used for waited saves)."""
        self.db_path = db_path
        self.outbox = outbox
        self.store = store
        self.samples = SampleWriter(store, today=today) if store is not None else None
        self._saver: threading.Thread | None = None

    def add_samples(self, frame: pl.DataFrame) -> None:
        """Samples for the store (kept only if the engine keeps samples)."""
        if self.samples is not None:
            self.samples.add(frame)

    def drop_user(self, user: str, *, erase: bool = False) -> None:
        """Forget ``user``'s unsaved samples; ``erase``: also wait for a write in flight, so
        that an erasure of the store that follows finds every row of theirs."""
        if self.samples is not None:
            self.samples.drop_user(user, settle=erase)

    def save(
        self,
        detector_state: bytes | Mapping[str, np.ndarray],
        now: datetime,
        *,
        wait: bool = False,
        ingest_seq: int | None = None,
        then: Callable[[], object] | None = None,
    ) -> None:
        """The detector state (a blob, or :meth:`Detector.state_arrays`, serialised on the
        snapshot thread) with ``ingest_seq`` (the last ingest-log record it contains), committed once the samples handed over before it are durable; ``then`` runs once both
        are saved (the log is truncated there: a record may go only when everything made of
        it is stored)."""
        self.join()
        if wait:
            self._save_detector(detector_state, now, ingest_seq, then, outbox=self.outbox)
        else:
            args = (detector_state, now, ingest_seq, then)
            self._saver = threading.Thread(target=self._save_detector, args=args, name="detector-save", daemon=True)
            self._saver.start()

    def join(self) -> None:
        """Wait for a save in flight (it may hold a user about to be erased)."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def sync_samples(self) -> bool:
        """Write every pending sample now (blocking); True once they are durable."""
        return self.samples.sync() if self.samples is not None else True

    def close(self) -> None:
        """Wait for the save in flight and write every pending sample (shutdown)."""
        self.join()
        if self.samples is not None and not self.samples.close():
            log.error("stopping with samples not stored: their ingest-log records are kept for the next start")

    def _save_detector(
        self,
        state: bytes | Mapping[str, np.ndarray],
        now: datetime,
        ingest_seq: int | None,
        then: Callable[[], object] | None,
        *,
        outbox: Outbox | None = None,
    ) -> None:
        blob = state if isinstance(state, bytes) else serialise_state(state).getbuffer()
        if self.samples is not None and not self.samples.sync():
            log.warning("detector state not saved: samples it covers are not stored yet (tried again at the next save)")
            return
        try:
            if outbox is not None:
                outbox.save_detector(blob, now, ingest_seq=ingest_seq)
            else:
                with Outbox(self.db_path) as own:
                    own.save_detector(blob, now, ingest_seq=ingest_seq)
        except StresswatchError as exc:  # the next save tries again; the engine keeps running
            log.warning("saving detector state: %s", exc)
            return
        if then is not None:
            then()


__all__ = ["SampleWriter", "StatePersister"]
