"""Incremental detector snapshots: users saved in chunks, each chunk at its own point of the
ingest log, restored and replayed from the start of the last save cycle that stored every
chunk it had to, with every batch a user's chunk already holds refused, give the windows and alerts of a detector that never stopped."""

from __future__ import annotations

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.detect import Detector
from stresswatch.errors import StorageError

from test_detector import MIX, MIX_BATCH, SETTINGS, SMALL, mixed_chunkings


@st.composite
def chunked_saves(draw):
    """A stream of batches (the ingest log, seq = position + 1), the chunk size, after which
    batches a save turn runs and which dirty chunks it saves, and the kill point."""
    batches, _ = draw(mixed_chunkings())
    size = draw(st.integers(1, 3))
    turns = {i: draw(st.integers(0, 2**16)) for i in draw(st.lists(st.integers(0, len(batches)), max_size=6))}
    kill_at = draw(st.integers(0, len(batches)))
    return batches, size, turns, kill_at


def windows_key(w: pl.DataFrame) -> pl.DataFrame:
    return w.unique(subset=["user", "window_start"], keep="first").sort("user", "window_start")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_saves())
@pytest.mark.parametrize("name", list(SETTINGS))
def test_chunked_saves_killed_anywhere_restore_to_the_detector_that_never_stopped(name, plan):
    s = SETTINGS[name]
    batches, size, turns, kill_at = plan
    stored: dict[int, tuple[dict, int]] = {}  # chunk -> (state, ingest seq it holds)
    complete = 0  # the start of the last save cycle that stored every chunk dirty at its start
    cycle: tuple[int, list[int]] | None = None  # (its start, chunks still to copy)
    d = Detector(s)
    before: list[pl.DataFrame] = []
    alerts = []
    for seq, batch in enumerate(batches[:kill_at], start=1):
        out = d.update(batch)
        before.append(out.windows)
        alerts += out.alerts
        if seq not in turns:
            continue
        if cycle is None:  # a cycle starts: the dirty chunks are to copy, the clean ones hold as they are at this point
            dirty = d.dirty_chunks(size)
            for c in set(stored) - set(dirty):
                stored[c] = (stored[c][0], seq)
            cycle = (seq, dirty)
        start, todo = cycle
        copy = [c for k, c in enumerate(todo) if turns[seq] >> k & 1]  # a turn copies some (a bit mask picks them)
        for c in copy:
            state = d.chunk_state(c, size)
            if state is None:
                stored.pop(c, None)
            else:
                stored[c] = (state, seq)
        todo = [c for c in todo if c not in copy]
        cycle = (start, todo) if todo else None
        if not todo:
            complete = start
    # killed: restore the chunks, replay the log from the last complete cycle's start
    r = Detector.from_chunk_states([st_ for st_, _ in stored.values()], s)
    oldest = complete
    held = {u: stored[r.chunk_of(u, size)][1] for u in r.users}  # restored users: the point their chunk holds
    after: list[pl.DataFrame] = []
    for seq, batch in enumerate(batches, start=1):
        if seq <= oldest:
            continue
        if seq <= held.get(batch["user"][0], 0):
            continue  # the user's chunk holds it: refused
        out = r.update(batch)
        after.append(out.windows)
        alerts += out.alerts
    out = r.flush()
    after.append(out.windows)
    alerts += out.alerts
    want_windows, want_alerts = MIX_BATCH[name]
    got = windows_key(pl.concat([*before, *after]))
    assert got.equals(want_windows)
    # a window given again after the restart is the same window
    again = pl.concat(after).join(pl.concat(before), on=["user", "window_start"], how="inner", suffix="_before") if before else None
    if again is not None and again.height:
        assert again["score"].equals(again["score_before"].alias("score"))
    assert {a.alert_id for a in alerts} == {a.alert_id for a in want_alerts}


def test_a_chunk_holds_only_its_users_rows_and_marks_only_them_clean():
    d = Detector(SMALL)
    half = MIX.filter(pl.col("time") < pl.col("time").min() + pl.duration(minutes=90))
    d.update(half)
    users = d.users
    assert d.dirty_chunks(1) == [0, 1, 2]
    state = d.chunk_state(1, 1)
    assert state is not None and state["users"].tolist() == [users[1]]
    assert set((state["b_key"][0] >> 32).tolist()) <= {0} and set((state["o_key"][0] >> 32).tolist()) <= {0}
    assert d.dirty_chunks(1) == [0, 2]
    alone = Detector.from_bytes(_npz(state), SMALL)
    assert alone.users == [users[1]]


def test_forgetting_a_user_vacates_their_slot_and_the_others_keep_theirs():
    d = Detector(SMALL)
    d.update(MIX.head(3000))
    first, second, third = d.users
    for c in d.dirty_chunks(1):
        d.chunk_state(c, 1)
    d = d.forget(second)
    assert d.dirty_chunks(1) == [1]  # the vacated chunk is saved again, without the user
    assert d.chunk_state(1, 1) is None
    assert d.chunk_of(third, 1) == 2 and d.dirty_chunks(1) == []
    d.update(MIX.filter(pl.col("user") == second).head(10))  # back: a new slot, never the old one
    assert d.chunk_of(second, 1) == 3


def test_a_chunk_from_another_version_is_refused_with_the_version_error():
    d = Detector(SMALL)
    d.update(MIX.head(100))
    state = d.chunk_state(0, 4)
    assert state is not None
    state["format"] = state["format"] + 1
    with pytest.raises(StorageError, match="incompatible version"):
        Detector.from_chunk_states([state], SMALL)


def _npz(state) -> bytes:
    from stresswatch.detect.detector import serialise_state

    return serialise_state(state).getvalue()
