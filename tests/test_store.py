"""The samples store: one dataset partitioned by UTC day; bulk appends, idempotent adds,
atomic and crash-safe commits and merges, erasure from every file."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.errors import ParseError, StorageError
from stresswatch.model import SAMPLES_SCHEMA
import json

from stresswatch.store import COMPACT_PARTS, KEY_COLUMNS, SampleStore

T0 = datetime(2026, 3, 31, 23, 59, 0, tzinfo=timezone.utc)  # spans a month boundary


def frame(user: str, n: int, *, start: datetime = T0, value: float = 800.0, metric: str = "rr_ms") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user": [user] * n,
            "time": [start + timedelta(seconds=i) for i in range(n)],
            "metric": [metric] * n,
            "value": [value + i for i in range(n)],
            "source": ["test"] * n,
        },
        schema=SAMPLES_SCHEMA,
    )


def test_add_then_read_round_trips_sorted_per_user(tmp_path: Path):
    store = SampleStore(tmp_path)
    a = frame("alice", 120)
    res = store.add(pl.concat([frame("bob", 5), a.reverse()]))
    assert (res.read, res.added, res.duplicates) == (125, 125, 0)
    got = store.read("alice")
    assert got.schema == pl.Schema(SAMPLES_SCHEMA)
    assert got.equals(a)
    assert store.users() == ["alice", "bob"]
    # partitioned by UTC day, all users together: the 120 s straddle 31 March / 1 April
    assert [p.parent.name for p in store.files()] == ["day=2026-03-31", "day=2026-04-01"]
    assert set(pl.read_parquet(store.files()[0])["user"]) == {"alice", "bob"}


def test_adding_the_same_rows_twice_adds_nothing_and_keeps_files(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 100))
    mtimes = {p: p.stat().st_mtime_ns for p in store.files()}
    res = store.add(frame("alice", 100))
    assert (res.read, res.added, res.duplicates) == (100, 0, 100)
    assert {p: p.stat().st_mtime_ns for p in store.files()} == mtimes
    # overlapping add: only the new tail is stored
    res = store.add(frame("alice", 150))
    assert (res.added, res.duplicates) == (50, 100)
    assert store.read("alice").height == 150


def test_duplicates_within_one_batch_collapse_but_distinct_values_at_one_instant_are_kept(tmp_path: Path):
    store = SampleStore(tmp_path)
    f = frame("alice", 3)
    other = f.with_columns(pl.col("value") + 1000)  # a second reading for the same instants
    res = store.add(pl.concat([f, f, other]))
    assert (res.read, res.added, res.duplicates) == (9, 6, 3)


def test_a_failing_add_leaves_the_previous_files_intact(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 10))
    before = {p: p.read_bytes() for p in store.files()}
    bad = frame("alice", 10, value=1.0).with_columns(pl.lit("heartbeats").alias("metric"))
    with pytest.raises(ParseError, match="unknown metric"):
        store.add(pl.concat([frame("alice", 20, value=5.0), bad]))
    assert {p: p.read_bytes() for p in store.files()} == before
    assert not list((store.dir / ".staging").glob("*"))


def test_a_staged_add_that_is_not_committed_stores_nothing(tmp_path: Path):
    store = SampleStore(tmp_path)
    with pytest.raises(RuntimeError), store.stage() as staged:
        staged.add(frame("alice", 10))
        staged.add(frame("bob", 10))
        raise RuntimeError("parser failed half-way")
    assert store.users() == []
    with store.stage() as staged:
        staged.add(frame("alice", 10))
        staged.add(frame("alice", 10, start=T0 + timedelta(hours=1)))
        res = staged.commit()
    assert (res.read, res.added) == (20, 20)


def test_a_write_failure_in_the_middle_of_a_commit_changes_no_file(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 10, start=T0 - timedelta(minutes=5)))
    before = {p: p.read_bytes() for p in store.files()}
    # 1 April's folder cannot be created (a file is in its way): 31 March's new rows were
    # already written to a temporary file, which must be discarded, not renamed.
    (store.dir / "day=2026-04-01").write_text("in the way")
    for write in (store.add, store.append):
        with pytest.raises(StorageError):
            write(pl.concat([frame("alice", 20, value=5.0, start=T0 - timedelta(minutes=1)), frame("bob", 90)]))
        assert {p: p.read_bytes() for p in store.files()} == before
        assert not [p for p in (store.dir / "day=2026-03-31").iterdir() if ".tmp" in p.name]


def test_an_interrupted_commit_is_rolled_forward(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 10, start=T0 - timedelta(minutes=5)))
    old_part = store.files()[0]
    # a merge that crashed after writing its journal: new part in a temp file, old part to delete
    merged = frame("alice", 30, start=T0 - timedelta(minutes=5))
    tmp = old_part.with_name(".part-x.tmp")
    merged.write_parquet(tmp)
    final = old_part.with_name("part-99999999999999999999-crash.parquet")
    (store.dir / ".journal-crash.json").write_text(json.dumps({"moves": [[str(tmp), str(final)]], "deletes": [str(old_part)]}))
    assert store.read("alice").height == 30  # a reader finishes the interrupted commit first
    assert store.files() == [final] and not old_part.exists()
    assert not list(store.dir.glob(".journal-*"))


def test_appends_write_one_file_per_day_for_all_users_and_readers_see_each_sample_once(tmp_path: Path):
    store = SampleStore(tmp_path)
    users = [f"u{i:03d}" for i in range(300)]
    flush = pl.concat([frame(u, 60, start=T0 - timedelta(hours=1)) for u in users])
    assert store.append(flush) == flush.height
    assert len(store.files()) == 1  # one file for 300 users: the cost is the rows, not the users
    # an engine replaying its log after a crash appends some rows again: still each sample once
    store.append(flush.filter(pl.col("user") == "u007"))
    assert store.read("u007").equals(frame("u007", 60, start=T0 - timedelta(hours=1)))
    assert store.count("u007") == 60
    assert store.users() == users
    # and an import of the same samples finds them stored
    res = store.add(frame("u001", 60, start=T0 - timedelta(hours=1)))
    assert (res.added, res.duplicates) == (0, 60)


def _file_rows(store: SampleStore) -> int:
    return sum(pl.read_parquet(f).height for f in store.files())


def test_small_files_of_a_day_are_merged_and_repeats_dropped(tmp_path: Path):
    store = SampleStore(tmp_path)
    day = T0 - timedelta(hours=3)
    for k in range(COMPACT_PARTS - 1):
        store.append(pl.concat([frame("alice", 3, start=day + timedelta(minutes=k)), frame("bob", 2, start=day + timedelta(minutes=k))]))
    store.append(frame("alice", 3, start=day))  # a repeat
    open_day = day.date()
    assert store.compact(today=open_day) == COMPACT_PARTS  # the day has COMPACT_PARTS small files
    assert len(store.files()) == 1 and _file_rows(store) == 5 * (COMPACT_PARTS - 1)
    store.append(frame("carol", 1, start=day))
    assert store.compact(today=open_day) == 0  # two files of a day still being written: left
    assert store.compact(today=open_day + timedelta(days=1)) == 2  # the day is over: one file
    assert len(store.files()) == 1 and store.read("carol").height == 1


@pytest.mark.parametrize("crash_after", ["write", "journal", "renames"])
def test_a_merge_killed_at_any_step_neither_loses_nor_duplicates_a_row(tmp_path: Path, crash_after: str, monkeypatch: pytest.MonkeyPatch):
    store = SampleStore(tmp_path)
    day = T0 - timedelta(hours=3)
    for k in range(4):
        store.append(frame("alice", 10, start=day + timedelta(minutes=k)))
    expected = store.read("alice")
    if crash_after == "write":  # the merged file written, the process killed before its journal
        monkeypatch.setattr(SampleStore, "_commit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            store.compact(today=day.date() + timedelta(days=1))
        monkeypatch.undo()
    else:
        with pytest.raises(StorageError):
            store.compact(today=day.date() + timedelta(days=1), fail_after=crash_after)
    after = SampleStore(tmp_path)  # a restarted process
    assert after.read("alice").equals(expected)
    assert _file_rows(after) == expected.height  # no row twice in the files either
    assert not [p for p in store.dir.rglob("*") if ".tmp" in p.name or ".journal" in p.name]
    after.compact(today=day.date() + timedelta(days=1))
    assert len(after.files()) == 1 and _file_rows(after) == expected.height


def test_files_of_the_earlier_per_user_layout_are_read_and_moved_into_days(tmp_path: Path):
    store = SampleStore(tmp_path)
    old = frame("al/ice", 30)
    legacy = store.dir / "al%2Fice" / "2026-03" / "part-1.parquet"
    legacy.parent.mkdir(parents=True)
    old.filter(pl.col("time").dt.month() == 3).write_parquet(legacy)
    legacy2 = store.dir / "al%2Fice" / "2026-04" / "part-1.parquet"
    legacy2.parent.mkdir(parents=True)
    old.filter(pl.col("time").dt.month() == 4).write_parquet(legacy2)
    store.append(frame("bob", 2))
    assert store.read("al/ice").equals(old)
    assert store.users() == ["al/ice", "bob"]
    store.compact(today=T0.date())
    assert all(p.parent.name.startswith("day=") for p in store.files())
    assert store.read("al/ice").equals(old) and not (store.dir / "al%2Fice").exists()


def test_erase_removes_the_user_from_every_file_and_reports_rows(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.append(pl.concat([frame("alice", 70), frame("bob", 4)]))  # two days
    store.append(frame("alice", 5, start=T0 - timedelta(hours=2)))  # a file holding only alice
    store.record_imports("alice", {"abc": {"file": "alice.fit", "options": {}, "at": "now"}})
    assert store.erase("alice") == 75
    assert store.users() == ["bob"]
    assert store.read("alice").height == 0
    for f in store.files():
        assert "alice" not in pl.read_parquet(f)["user"].to_list()
    assert not any(b"alice" in p.read_bytes() for p in store.dir.rglob("*") if p.is_file())
    assert store.import_log("alice") == {}
    assert store.erase("alice") == 0
    assert store.read("bob").height == 4


@pytest.mark.parametrize("crash_after", ["journal", "renames"])
def test_an_erasure_killed_midway_is_finished_by_the_next_store_operation(tmp_path: Path, crash_after: str):
    store = SampleStore(tmp_path)
    store.append(pl.concat([frame("alice", 70), frame("bob", 4)]))
    with pytest.raises(StorageError):
        store.erase("alice", fail_after=crash_after)
    after = SampleStore(tmp_path)
    assert after.read("alice").height == 0 and after.read("bob").height == 4
    assert _file_rows(after) == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(min_size=1, max_size=20).filter(lambda u: "\x00" not in u))
def test_any_user_id_stays_inside_the_store(tmp_path: Path, user: str):
    store = SampleStore(tmp_path / "root")
    store.add(frame(user, 2))
    assert user in store.users()
    assert store.read(user)["user"].to_list() == [user, user]
    store.record_imports(user, {"abc": {"file": "x", "options": {}, "at": "now"}})
    for p in (tmp_path / "root").rglob("*"):
        assert (tmp_path / "root" / "samples") in p.parents or p == tmp_path / "root" / "samples"
    assert store.import_log(user)
    assert store.erase(user) == 2
    assert store.import_log(user) == {}


def test_default_root_is_the_configured_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from stresswatch.config import load_settings

    settings_ = load_settings(overrides={"store.state_dir": str(tmp_path / "state")})
    store = SampleStore.from_settings(settings_)
    store.add(frame("alice", 1))
    assert (tmp_path / "state" / "samples").is_dir()
    assert os.listdir(tmp_path / "state" / "samples")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 200), max_size=6), repeat=st.integers(0, 200))
def test_adding_in_any_chunks_with_repeats_equals_one_add(tmp_path_factory: pytest.TempPathFactory, cuts: list[int], repeat: int):
    whole = pl.concat([frame("alice", 120), frame("bob", 80, start=T0 - timedelta(days=40))])
    one = SampleStore(tmp_path_factory.mktemp("one"))
    one.add(whole)
    many = SampleStore(tmp_path_factory.mktemp("many"))
    bounds = sorted({0, whole.height, *[c % whole.height for c in cuts]})
    total_added = 0
    for a, b in zip(bounds, bounds[1:]):
        total_added += many.add(whole.slice(a, b - a)).added
    total_added += many.add(whole.slice(repeat % whole.height, 7)).added  # a repeat adds nothing
    assert total_added == whole.height
    for user in ("alice", "bob"):
        assert many.read(user).equals(one.read(user))
