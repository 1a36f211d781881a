"""Saving the engine's state: the detector blob (on a writer thread) and buffered samples.

The detector is serialised on the engine thread; the SQLite write of the blob (hundreds of MB
at 100,000 users, seconds) runs on a writer thread with its own connection unless ``wait``,
so ingest does not stall behind it. One save at a time, in order; erasure and shutdown wait
for it (:meth:`StatePersister.join`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import polars as pl

from ..alerts.outbox import Outbox
from ..errors import StresswatchError
from ..store import SampleStore

log = logging.getLogger("stresswatch.engine")


class StatePersister:
    def __init__(self, db_path: Path, outbox: Outbox, store: SampleStore | None) -> None:
        """``outbox``: the engine thread's connection (used for waited saves)."""
        self.db_path = db_path
        self.outbox = outbox
        self.store = store
        self._samples: list[pl.DataFrame] = []
        self._saver: threading.Thread | None = None

    def add_samples(self, frame: pl.DataFrame) -> None:
        """Samples for the store (kept only if the engine keeps samples)."""
        if self.store is not None:
            self._samples.append(frame)

    def drop_user(self, user: str) -> None:
        self._samples = [f.filter(pl.col("user") != user) for f in self._samples]

    def save(
        self,
        detector_blob: bytes,
        now: datetime,
        *,
        wait: bool = False,
        ingest_seq: int | None = None,
        then: Callable[[], object] | None = None,
    ) -> None:
        """Samples first, then the detector state with ``ingest_seq`` (the last ingest-log
        record it contains); ``then`` runs once both are saved (the log is truncated there:
        a record may go only when everything made of it is stored)."""
        self.join()
        if self.store is not None and self._samples:
            frames, self._samples = self._samples, []
            self.store.add(pl.concat(frames, how="vertical"))
        if wait:
            self.outbox.save_detector(detector_blob, now, ingest_seq=ingest_seq)
            if then is not None:
                then()
        else:
            args = (detector_blob, now, ingest_seq, then)
            self._saver = threading.Thread(target=self._save_detector, args=args, name="detector-save", daemon=True)
            self._saver.start()

    def join(self) -> None:
        """Wait for a save in flight (it may hold a user about to be erased)."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def _save_detector(self, blob: bytes, now: datetime, ingest_seq: int | None, then: Callable[[], object] | None) -> None:
        try:
            with Outbox(self.db_path) as outbox:
                outbox.save_detector(blob, now, ingest_seq=ingest_seq)
        except StresswatchError as exc:  # the next save tries again; the engine keeps running
            log.warning("saving detector state: %s", exc)
            return
        if then is not None:
            then()


__all__ = ["StatePersister"]
