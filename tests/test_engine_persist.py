"""The engine's persistence off its thread: samples of all users written in bulk by the sample
writer, and a detector snapshot committed only once the samples it covers are on disk.
Real Parquet files and a real SQLite outbox."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from stresswatch.alerts.outbox import Outbox
from stresswatch.engine.persist import SampleWriter, StatePersister
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.store import SampleStore

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1)


def flush_frame(users: int, rows: int, start: datetime = T0) -> pl.DataFrame:
    """One engine flush: ``rows`` RR samples for each of ``users`` users."""
    n = users * rows
    return pl.DataFrame(
        {
            "user": [f"u{i // rows:05d}" for i in range(n)],
            "time": [start + timedelta(seconds=i % rows) for i in range(n)],
            "metric": ["rr_ms"] * n,
            "value": [800.0 + i % rows for i in range(n)],
            "source": ["strap"] * n,
        },
        schema=SAMPLES_SCHEMA,
    )


def test_the_flushes_of_many_users_become_one_file_per_write(tmp_path: Path):
    store = SampleStore(tmp_path)
    writer = SampleWriter(store, interval_s=60)
    for k in range(3):  # three engine flushes of 500 users each, one write
        writer.add(flush_frame(500, 4, start=T0 + timedelta(seconds=4 * k)))
    assert writer.sync(timeout_s=30)
    assert len(store.files()) == 1 and writer.rows_written == 3 * 500 * 4
    assert store.read("u00042").height == 12
    writer.close()


def test_rows_that_cannot_be_written_stay_pending_and_no_snapshot_claims_them(tmp_path: Path):
    state = tmp_path / "state"
    store = SampleStore(state)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, store)
    truncated: list[int] = []
    persister.add_samples(flush_frame(20, 3))
    # the day's folder cannot be created (a full disk would do the same): the write fails
    blocker = state / "samples" / f"day={T0.date()}"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    persister.save(b"state-1", NOW, wait=True, ingest_seq=7, then=lambda: truncated.append(7))
    assert outbox.ingest_seq() == 0 and outbox.load_detector() is None and truncated == []
    assert persister.samples is not None and persister.samples.pending_rows == 60
    blocker.unlink()  # space again: the next save writes the rows, then the snapshot
    persister.save(b"state-2", NOW, wait=True, ingest_seq=9, then=lambda: truncated.append(9))
    assert outbox.ingest_seq() == 9 and outbox.load_detector() == b"state-2" and truncated == [9]
    assert store.read("u00003").height == 3
    persister.close()
    outbox.close()


def test_a_snapshot_on_the_writer_thread_waits_for_the_samples_before_it(tmp_path: Path):
    store = SampleStore(tmp_path / "state")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, store)
    assert persister.samples is not None
    persister.samples.interval_s = 3600  # only a snapshot makes the writer write
    persister.add_samples(flush_frame(50, 2))
    persister.save(b"blob", NOW, ingest_seq=3)
    persister.join()
    assert store.count("u00049") == 2  # on disk before the snapshot that covers them
    assert outbox.ingest_seq() == 3
    persister.close()
    outbox.close()


def test_an_erased_users_pending_rows_are_dropped(tmp_path: Path):
    store = SampleStore(tmp_path)
    writer = SampleWriter(store, interval_s=3600)
    writer.add(flush_frame(3, 5))
    writer.drop_user("u00001", settle=True)
    assert writer.close()
    assert store.users() == ["u00000", "u00002"]
