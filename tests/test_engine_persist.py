"""The engine's persistence off its thread: samples of all users written in bulk by the sample
writer, and incremental detector snapshots (chunks of users, copied a few per engine turn)
committed only once the samples they cover are on disk.
Real Parquet files and a real SQLite outbox."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.alerts.outbox import Outbox
from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.errors import StorageError
from stresswatch.engine.persist import CHUNK_USERS, SampleWriter, StatePersister, stored_detector
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.store import SampleStore

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1)
SMALL = DetectorSettings(window_s=60, baseline_windows=60, baseline_min_windows=30, baseline_refresh_s=600)


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


def detector_of(users: int, minutes: int = 3, start: datetime = T0) -> Detector:
    """A detector holding ``users`` users' beats (one a second for ``minutes``)."""
    d = Detector(SMALL)
    d.update(flush_frame(users, 60 * minutes, start=start))
    return d


def test_rows_that_cannot_be_written_stay_pending_and_no_snapshot_claims_them(tmp_path: Path):
    state = tmp_path / "state"
    store = SampleStore(state)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, store, chunk_users=4)
    d = detector_of(10)
    truncated: list[int] = []
    persister.add_samples(flush_frame(20, 3))
    # the day's folder cannot be created (a full disk would do the same): the write fails
    blocker = state / "samples" / f"day={T0.date()}"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    persister.save(lambda: d, lambda: 7, NOW, wait=True, then=lambda: truncated.append(7))
    assert persister.files.positions() == [] and outbox.detector_save() is None and truncated == []
    assert persister.samples is not None and persister.samples.pending_rows == 60
    blocker.unlink()  # space again: the next save writes the rows, then the chunks not stored
    persister.save(lambda: d, lambda: 9, NOW, wait=True, then=lambda: truncated.append(9))
    assert persister.files.positions() == [(0, 9), (1, 9), (2, 9)] and outbox.detector_save() == (9, 4) and truncated == [9]
    assert store.read("u00003").height == 3
    assert stored_detector(outbox, SMALL).to_bytes() == d.to_bytes()
    persister.close()
    outbox.close()


def test_a_snapshot_on_the_writer_thread_waits_for_the_samples_before_it(tmp_path: Path):
    store = SampleStore(tmp_path / "state")
    outbox = Outbox(tmp_path / "outbox.sqlite")
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, store)
    assert persister.samples is not None
    persister.samples.interval_s = 3600  # only a snapshot makes the writer write
    persister.add_samples(flush_frame(50, 2))
    d = detector_of(3)
    persister.save(lambda: d, lambda: 3, NOW)  # no engine to run turns: copied at once, written on the thread
    persister.join()
    assert store.count("u00049") == 2  # on disk before the snapshot that covers them
    assert outbox.detector_save() == (3, CHUNK_USERS)
    persister.close()
    outbox.close()


def test_a_save_turn_copies_at_most_the_chunk_bound_and_only_what_changed(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    turns: list[Callable[[], None]] = []
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, None, call_soon=turns.append, chunk_users=5, turn_budget_s=0.0, queued_chunks=1)
    d = detector_of(23)  # 5 chunks
    copied: list[int] = []
    take = d.chunk_state

    def counting(chunk: int, size: int):
        state = take(chunk, size)
        copied.append(0 if state is None else len(state["users"]))
        return state

    d.chunk_state = counting  # type: ignore[method-assign]
    assert persister.save(lambda: d, lambda: 5, NOW)
    per_turn = [len(copied)]
    for _ in range(10):  # the engine runs each turn as a job of its own, after the ingest queued before it
        persister.join()  # the snapshot thread asks for the next turn once it has room
        if not turns:
            break
        before = len(copied)
        turns.pop(0)()
        per_turn.append(len(copied) - before)
    assert not persister.saving
    assert per_turn == [1, 1, 1, 1, 1] and max(copied) <= 5 and sum(copied) == 23
    assert outbox.detector_save() == (5, 5)
    # a user of chunk 3 sends more: the next save copies that chunk alone
    d.update(flush_frame(23, 2, start=T0 + timedelta(minutes=3)).filter(pl.col("user") == "u00017"))
    copied.clear()
    persister.save(lambda: d, lambda: 6, NOW)
    persister.join()
    assert not turns and not persister.saving
    assert copied == [5] and dict(persister.files.positions())[3] == 6 and dict(persister.files.positions())[0] == 5
    assert outbox.detector_save() == (6, 5)
    persister.close()
    assert stored_detector(outbox, SMALL).to_bytes() == d.to_bytes()
    outbox.close()


def test_an_earlier_single_blob_snapshot_loads_and_the_first_complete_save_replaces_it(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    d = detector_of(9)
    outbox.save_detector(d.to_bytes(), NOW, ingest_seq=41)
    persister = StatePersister(tmp_path / "outbox.sqlite", outbox, None, chunk_users=4)
    restored = persister.restore(SMALL)
    assert restored.replay_after == 41 and restored.holds("u00008", 41) and not restored.holds("u00008", 42)
    assert restored.detector.to_bytes() == d.to_bytes()
    assert restored.detector.dirty_chunks(4) == [0, 1, 2]  # every user: the blob goes once they are all in chunks
    persister.save(lambda: restored.detector, lambda: 50, NOW, wait=True)
    assert outbox.load_detector() is None and outbox.detector_save() == (50, 4)
    assert stored_detector(outbox, SMALL).to_bytes() == d.to_bytes()
    persister.close()
    outbox.close()


def test_an_erased_users_pending_rows_are_dropped(tmp_path: Path):
    store = SampleStore(tmp_path)
    writer = SampleWriter(store, interval_s=3600)
    writer.add(flush_frame(3, 5))
    writer.drop_user("u00001", settle=True)
    assert writer.close()
    assert store.users() == ["u00000", "u00002"]


def test_erasure_rewrites_the_chunk_that_holds_the_user_at_the_position_it_holds(tmp_path: Path):
    from stresswatch.consent.ledger import ConsentLedger
    from stresswatch.consent.rights import erase_stores

    outbox = Outbox(tmp_path / "stresswatch.sqlite")
    persister = StatePersister(outbox.path, outbox, None, chunk_users=2)
    d = detector_of(5)
    persister.save(lambda: d, lambda: 12, NOW, wait=True)
    with ConsentLedger(outbox.path) as ledger:
        removed = erase_stores("u00002", ledger=ledger, outbox=outbox, store=None, now=NOW, detector_settings=SMALL)
    assert removed["detector_state"] == 1
    assert persister.files.positions() == [(0, 12), (1, 12), (2, 12)]
    assert persister.files.users(1) == ["u00003"]
    assert stored_detector(outbox, SMALL).to_bytes() == d.forget("u00002").to_bytes()
    persister.close()
    outbox.close()


def test_a_chunk_file_that_cannot_be_read_stops_the_start_with_a_storage_error(tmp_path: Path):
    outbox = Outbox(tmp_path / "stresswatch.sqlite")
    persister = StatePersister(outbox.path, outbox, None, chunk_users=2)
    d = detector_of(3)
    persister.save(lambda: d, lambda: 4, NOW, wait=True)
    persister.close()
    persister.files.path(1).write_bytes(b"not a chunk")
    with pytest.raises(StorageError, match="chunk 1"):
        StatePersister(outbox.path, outbox, None).restore(SMALL)
    outbox.close()
