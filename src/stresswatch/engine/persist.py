"""Saving the engine's state: the detector blob (on a writer thread) and buffered samples.

The detector is serialised on the engine thread; the SQLite write of the blob (hundreds of MB
at 100,000 users, seconds) runs on a writer thread with its own connection unless ``wait``,
so ingest does not stall behind it. One save at a time, in order; erasure and shutdown wait
for it (:meth:`StatePersister.join`).
"""

from __future__ import annotations

import logging
import threading
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

    def save(self, detector_blob: bytes, now: datetime, *, wait: bool = False) -> None:
        self.join()
        if wait:
            self.outbox.save_detector(detector_blob, now)
        else:
            self._saver = threading.Thread(target=self._save_detector, args=(detector_blob, now), name="detector-save", daemon=True)
            self._saver.start()
        if self.store is not None and self._samples:
            frames, self._samples = self._samples, []
            self.store.add(pl.concat(frames, how="vertical"))

    def join(self) -> None:
        """Wait for a save in flight (it may hold a user about to be erased)."""
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def _save_detector(self, blob: bytes, now: datetime) -> None:
        try:
            with Outbox(self.db_path) as outbox:
                outbox.save_detector(blob, now)
        except StresswatchError as exc:  # the next save tries again; the engine keeps running
            log.warning("saving detector state: %s", exc)


__all__ = ["StatePersister"]
