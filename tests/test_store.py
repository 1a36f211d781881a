"""The samples store: idempotent, atomic, per user, erasable."""

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
    # partitioned by UTC month: the 120 s straddle 31 March / 1 April
    assert [p.parent.name for p in store.files("alice")] == ["2026-03", "2026-04"]


def test_adding_the_same_rows_twice_adds_nothing_and_keeps_files(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 100))
    mtimes = {p: p.stat().st_mtime_ns for p in store.files("alice")}
    res = store.add(frame("alice", 100))
    assert (res.read, res.added, res.duplicates) == (100, 0, 100)
    assert {p: p.stat().st_mtime_ns for p in store.files("alice")} == mtimes
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
    before = {p: p.read_bytes() for p in store.files("alice")}
    bad = frame("alice", 10, value=1.0).with_columns(pl.lit("heartbeats").alias("metric"))
    with pytest.raises(ParseError, match="unknown metric"):
        store.add(pl.concat([frame("alice", 20, value=5.0), bad]))
    assert {p: p.read_bytes() for p in store.files("alice")} == before
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
    store.add(frame("alice", 10))
    before = {p: p.read_bytes() for p in store.files("alice")}
    # bob's folder cannot be created (a file is in its way): alice's merge was already written
    # to a temporary file, which must be discarded, not renamed.
    (store.dir / "bob").write_text("in the way")
    with pytest.raises(StorageError):
        store.add(pl.concat([frame("alice", 20, value=5.0), frame("bob", 3)]))
    assert {p: p.read_bytes() for p in store.files("alice")} == before
    assert not [p for p in (store.dir / "alice").iterdir() if ".tmp-" in p.name]


def test_an_interrupted_commit_is_rolled_forward(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(frame("alice", 10))
    old_part = store.files("alice")[0]
    # a compaction that crashed after writing its journal: new part in a temp file, old part to delete
    merged = frame("alice", 30).filter(pl.col("time").dt.month() == 3)
    tmp = old_part.with_name(".part-x.tmp")
    merged.write_parquet(tmp)
    final = old_part.with_name("part-99999999999999999999-crash.parquet")
    (store.dir / ".journal-crash.json").write_text(json.dumps({"moves": [[str(tmp), str(final)]], "deletes": [str(old_part)]}))
    assert store.read("alice").height == 10  # readers never see temp files
    store.add(frame("carol", 1))  # any later write finishes the interrupted commit first
    assert store.read("alice").filter(pl.col("time").dt.month() == 3).height == merged.height
    assert store.files("alice")[0] == final and not old_part.exists()
    assert not list(store.dir.glob(".journal-*"))


def test_appends_write_only_new_rows_and_small_parts_are_compacted(tmp_path: Path):
    store = SampleStore(tmp_path)
    stream = frame("alice", 25, start=T0 - timedelta(hours=1))
    store.add(stream.head(20))
    first = store.files("alice")
    assert len(first) == 1
    # a live checkpoint overlapping the last 5 stored rows: one new part holding only the 5 new rows
    store.add(stream.slice(15, 10))
    parts = store.files("alice")
    assert len(parts) == 2 and first[0] in parts
    assert pl.read_parquet([p for p in parts if p != first[0]][0]).height == 5
    for k in range(1, COMPACT_PARTS + 2):
        store.add(frame("alice", 3, start=T0 - timedelta(minutes=50) + timedelta(seconds=10 * k)))
    assert len(store.files("alice")) < COMPACT_PARTS
    got = store.read("alice")
    assert got.height == 25 + 3 * (COMPACT_PARTS + 1)
    assert got["time"].is_sorted() and got.unique(subset=list(KEY_COLUMNS)).height == got.height


def test_erase_removes_the_user_and_reports_rows(tmp_path: Path):
    store = SampleStore(tmp_path)
    store.add(pl.concat([frame("alice", 70), frame("bob", 4)]))
    assert store.erase("alice") == 70
    assert store.users() == ["bob"]
    assert store.read("alice").height == 0
    assert not (store.dir / "alice").exists()
    assert store.erase("alice") == 0
    assert store.read("bob").height == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(min_size=1, max_size=20).filter(lambda u: "\x00" not in u))
def test_any_user_id_stays_inside_the_store(tmp_path: Path, user: str):
    store = SampleStore(tmp_path / "root")
    store.add(frame(user, 2))
    assert user in store.users()
    assert store.read(user)["user"].to_list() == [user, user]
    for p in (tmp_path / "root").rglob("*.parquet"):
        assert (tmp_path / "root" / "samples") in p.parents
    assert store.erase(user) == 2


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
