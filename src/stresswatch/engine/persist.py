"""Saving the engine's state: samples in bulk and the detector snapshot, off the engine thread.

* **Samples** (``engine.keep_samples``): the engine thread only hands each flush's frame to a
  :class:`SampleWriter`; its own thread writes everything pending every ``interval_s`` (or
  sooner once ``max_rows`` are waiting) as one :meth:`SampleStore.append` (one Parquet file
  per UTC day, all users together) and merges the store's small files in the background.
  The cost is the rows, never the number of users: a per-user append on the engine thread
  (6-8 ms a user) stalled the engine for minutes per save at 100,000 users.
* **Detector snapshot**, incremental (:class:`StatePersister`): only the chunks of users
  whose state changed, copied a few at a time on the engine thread (a bounded stall per
  turn; a copy of the whole detector held it 1.3 s and doubled its memory at 100,000 users),
  serialised and written on a snapshot thread with its own connection. A chunk is committed
  only after every sample handed over before it is durable, so it never covers ingest-log
  records whose samples could still be lost; ``then`` (the log's truncation) runs once the
  whole save is stored.

One save at a time, in order; erasure and shutdown wait for it (:meth:`StatePersister.join`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from ..alerts.outbox import Outbox
from ..config import DetectorSettings
from ..detect import Detector
from ..errors import StresswatchError
from ..store import SampleStore
from .snapshot_files import SnapshotChunks

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


CHUNK_USERS = 4_096  # users per snapshot chunk (fixed by the first chunked save of a state folder)
TURN_BUDGET_S = 0.05  # engine-thread time a save turn may spend copying chunks (at least one chunk)
QUEUED_CHUNKS = 2  # chunks copied and not yet written: the memory a save holds beyond the live state


@dataclass
class Restored:
    """The detector as stored, and what of the ingest log it holds: replay every record after
    ``replay_after`` except those a restored user's chunk already holds (:meth:`holds`)."""

    detector: Detector
    replay_after: int
    held: dict[str, int] = field(default_factory=dict)  # restored user -> last ingest seq their chunk holds

    def holds(self, user: str, seq: int) -> bool:
        return seq <= self.held.get(user, 0)

    @property
    def last_seq(self) -> int:
        return max(self.held.values(), default=self.replay_after)


@dataclass
class _Cycle:
    start_seq: int  # the ingest position when it began: every chunk dirty then is copied after it
    todo: list[int]  # chunks still to copy
    now: datetime
    then: Callable[[], object] | None
    failed: bool = False  # a chunk was not stored: the cycle is not complete (its chunks stay dirty)


class StatePersister:
    """Incremental detector snapshots: only the chunks of users whose state changed, copied a
    few at a time on the engine thread and written on the snapshot thread.

    A save (:meth:`save`) is a *cycle*: it takes the chunks dirty at its start (``start_seq``,
    the ingest-log position then) and copies them in *turns*, engine jobs queued behind
    ingest, each copying chunks for at most :data:`TURN_BUDGET_S` (at least one chunk) and
    at most :data:`QUEUED_CHUNKS` waiting to be written, so neither the engine thread's
    stall nor the memory a save holds grows with the number of users. Each copied chunk
    carries the ingest position of its copy (the engine flushes its buffer before every
    job, so the detector then holds every record up to it). The snapshot thread waits until
    the samples handed over before them are durable, then replaces each chunk's file (state
    and position in one atomic rename, :mod:`.snapshot_files`). When every chunk of the
    cycle is stored it records ``start_seq`` as the *complete* position, and ``then`` (the
    ingest log's truncation) runs. A chunk not stored (samples or the file write failing) is
    dirty again for the next cycle, which does not start before the snapshot thread has
    finished this one's writes.

    Restart (:meth:`restore`): every chunk is loaded; the log is replayed from the complete
    position, and a restored user's records up to their chunk's own position are refused
    (the chunk holds them). That is exact because users are independent: a chunk clean at
    a cycle's start had no record of its users since its copy, and a user not restored was
    created after the last copy of their chunk, so all their records are after the complete
    position. State not per user is described at :meth:`Detector.dirty_chunks`. Only the
    log up to the previous complete position is deleted.

    A single-blob snapshot of an earlier version is read as the chunks it contains (at its
    ingest position), any chunk stored since replacing its own; every user is then dirty,
    so the first complete cycle stores them all and removes the blob.
    """

    def __init__(
        self,
        db_path: Path,
        outbox: Outbox,
        store: SampleStore | None,
        *,
        today: Callable[[], date] | None = None,
        call_soon: Callable[[Callable[[], None]], None] | None = None,
        chunk_users: int = CHUNK_USERS,
        turn_budget_s: float = TURN_BUDGET_S,
        queued_chunks: int = QUEUED_CHUNKS,
    ) -> None:
        """``outbox``: the engine thread's connection (read at :meth:`restore`); the chunk
        files live beside its database (:class:`.snapshot_files.SnapshotChunks`).
        ``call_soon``: runs a job on the engine thread after what is queued (without one,
        every save copies all its chunks at once, as with ``wait``)."""
        self.db_path = db_path
        self.outbox = outbox
        self.store = store
        self.samples = SampleWriter(store, today=today) if store is not None else None
        self.chunk_users = chunk_users
        self.turn_budget_s = turn_budget_s
        self.queued_chunks = max(1, queued_chunks)
        self._call_soon = call_soon
        self.files = SnapshotChunks.of_state_dir(db_path.parent)
        self._detector: Callable[[], Detector] | None = None
        self._seq: Callable[[], int] = lambda: 0
        self._cycle: _Cycle | None = None
        self._single_blob = False  # an earlier version's snapshot is still stored
        self._work: queue.Queue[tuple[str, object] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # chunks copied, not yet written
        self._turn_asked = False
        self._failed: set[int] = set()  # chunks whose write failed: dirty again
        self._thread: threading.Thread | None = None
        # for operators and the benchmark
        self.turns = 0
        self.turns_s = 0.0  # engine-thread time in turns, all saves
        self.write_s = 0.0  # snapshot-thread time writing chunks, all saves
        self.longest_turn_s = 0.0
        self.chunks_written = 0
        self.cycles_completed = 0

    # -- start ---------------------------------------------------------------------------
    def restore(self, settings: DetectorSettings | None = None) -> Restored:
        """The stored detector (chunks, or an earlier version's single blob, or a new one)."""
        save = self.outbox.detector_save()
        if save is not None:
            self.chunk_users = save[1]  # chunk numbers mean slots / this size: fixed by the store
        states: dict[int, tuple[dict[str, np.ndarray], int]] = {}
        self.files.clean()
        for chunk in self.files.chunks():
            states[chunk] = self.files.read(chunk)
        blob = self.outbox.load_detector()
        replay_after = save[0] if save is not None else 0
        if blob:
            self._single_blob = True
            seq = self.outbox.ingest_seq()
            old = Detector.from_bytes(blob, settings)
            for chunk in old.chunk_slots(self.chunk_users):
                if chunk not in states:
                    state = old.chunk_state(chunk, self.chunk_users)
                    assert state is not None
                    states[chunk] = (state, seq)
            del old
            replay_after = seq if save is None else min(seq, replay_after)
        held = {str(u): seq for z, seq in states.values() for u in z["users"].tolist()}
        detector = Detector.from_chunk_states([z for z, _ in states.values()], settings)
        if blob:
            detector.mark_all_dirty()
        return Restored(detector, replay_after, held)

    # -- saving (engine thread) ------------------------------------------------------------
    def add_samples(self, frame: pl.DataFrame) -> None:
        """Samples for the store (kept only if the engine keeps samples)."""
        if self.samples is not None:
            self.samples.add(frame)

    def drop_user(self, user: str, *, erase: bool = False) -> None:
        """Forget ``user``'s unsaved samples; ``erase``: also wait for a write in flight, so
        that an erasure of the store that follows finds every row of theirs."""
        if self.samples is not None:
            self.samples.drop_user(user, settle=erase)

    @property
    def saving(self) -> bool:
        """A cycle is copying chunks, or the snapshot thread is still writing one."""
        return self._cycle is not None or self._work.unfinished_tasks > 0

    def save(
        self,
        detector: Callable[[], Detector],
        ingest_seq: Callable[[], int],
        now: datetime,
        *,
        wait: bool = False,
        then: Callable[[], object] | None = None,
    ) -> bool:
        """Begin a cycle (see the class doc) over ``detector()`` (read at every turn: the
        engine may replace it) at ``ingest_seq()`` (the last ingest-log record the detector
        holds, read at every copy). ``wait``: finish it, and one under way, before returning.
        False if a cycle is still under way (without ``wait``: its writes are not done yet,
        this interval's changes go to the next one)."""
        self._detector, self._seq = detector, ingest_seq
        if self.saving:
            if not wait:
                return False
            self._finish()
        d = detector()
        with self._lock:
            failed, self._failed = self._failed, set()
        d.mark_chunks_dirty(sorted(failed), self.chunk_users)
        self._cycle = _Cycle(ingest_seq(), d.dirty_chunks(self.chunk_users), now, then)
        if wait or self._call_soon is None:
            self._finish()
        else:
            self._turn()
        return True

    def _turn(self) -> None:
        """Copy the next chunks of the cycle (engine thread): bounded by time and by what waits
        to be written; asks for the next turn, or the snapshot thread does once it has room."""
        with self._lock:
            self._turn_asked = False
        c = self._cycle
        if c is None or self._detector is None:
            return
        t = time.monotonic()
        d, seq = self._detector(), self._seq()
        batch: list[tuple[int, dict[str, np.ndarray] | None, int]] = []
        while c.todo:
            with self._lock:
                if batch and (self._queued + len(batch) >= self.queued_chunks or time.monotonic() - t >= self.turn_budget_s):
                    break
            chunk = c.todo.pop(0)
            batch.append((chunk, d.chunk_state(chunk, self.chunk_users), seq))
        spent = time.monotonic() - t
        self.turns += 1
        self.turns_s += spent
        self.longest_turn_s = max(self.longest_turn_s, spent)
        if batch:
            with self._lock:
                self._queued += len(batch)
            self._put(("chunks", (c, batch)))
        if not c.todo:
            self._cycle = None
            self._put(("complete", c))
            return
        self._ask_turn(c)

    def _ask_turn(self, c: _Cycle) -> None:
        with self._lock:
            if self._turn_asked or self._queued >= self.queued_chunks or self._cycle is not c or self._call_soon is None:
                return
            self._turn_asked = True
        self._call_soon(self._turn)

    def _finish(self) -> None:
        """Copy and write everything of the cycle under way now (blocking)."""
        while self._cycle is not None:
            c = self._cycle
            self._turn()
            if self._cycle is c:
                self._wait_for_room()
        self.join()

    def _wait_for_room(self) -> None:
        while True:
            with self._lock:
                if self._queued < self.queued_chunks:
                    return
            time.sleep(0.005)

    def _put(self, item: tuple[str, object]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="detector-save", daemon=True)
            self._thread.start()
        self._work.put(item)

    def join(self) -> None:
        """Wait until every chunk copied so far is written (a chunk copied before a user was
        forgotten holds them: it must land before an erasure)."""
        self._work.join()

    def sync_samples(self) -> bool:
        """Write every pending sample now (blocking); True once they are durable."""
        return self.samples.sync() if self.samples is not None else True

    def close(self) -> None:
        """Wait for the writes in flight and write every pending sample (shutdown)."""
        self.join()
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
        if self.samples is not None and not self.samples.close():
            log.error("stopping with samples not stored: their ingest-log records are kept for the next start")

    # -- the snapshot thread ---------------------------------------------------------------
    def _run(self) -> None:
        with Outbox(self.db_path) as outbox:
            while True:
                item = self._work.get()
                try:
                    if item is None:
                        return
                    kind, what = item
                    if kind == "chunks":
                        self._write(outbox, *what)  # type: ignore[misc]
                    else:
                        self._complete(outbox, what)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - the snapshot thread must go on for the next save
                    log.exception("saving detector state")
                    if item is not None and isinstance(item[1], tuple):
                        item[1][0].failed = True
                finally:
                    self._work.task_done()

    def _write(self, outbox: Outbox, c: _Cycle, batch: list[tuple[int, dict[str, np.ndarray] | None, int]]) -> None:
        chunks = [chunk for chunk, _, _ in batch]
        ok = False
        try:
            if self.samples is not None and not self.samples.sync():
                log.warning("detector state not saved: samples it covers are not stored yet (tried again at the next save)")
            else:
                t = time.monotonic()
                while batch:
                    chunk, state, seq = batch.pop(0)  # each copy goes once it is written
                    self.files.write(chunk, state, seq)
                    del state
                    self.chunks_written += 1
                self.write_s += time.monotonic() - t
                ok = True
        except StresswatchError as exc:  # the next save tries again; the engine keeps running
            log.warning("saving detector state: %s", exc)
        finally:
            with self._lock:
                self._queued -= len(chunks)
                if not ok:
                    self._failed.update(chunks)
            if not ok:
                c.failed = True
            self._ask_turn(c)

    def _complete(self, outbox: Outbox, c: _Cycle) -> None:
        if c.failed:
            return
        try:
            outbox.complete_detector_save(c.start_seq, self.chunk_users, c.now, drop_single_blob=self._single_blob)
        except StresswatchError as exc:
            log.warning("saving detector state: %s", exc)
            return
        self._single_blob = False
        self.cycles_completed += 1
        if c.then is not None:
            c.then()


def stored_detector(outbox: Outbox, settings: DetectorSettings | None = None) -> Detector:
    """The detector as the state folder holds it (what the engine restores before replaying)."""
    return StatePersister(outbox.path, outbox, None).restore(settings).detector


__all__ = ["CHUNK_USERS", "Restored", "SampleWriter", "StatePersister", "stored_detector"]
