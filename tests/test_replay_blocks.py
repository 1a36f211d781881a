"""Replay's reading of realistic mixed input (per-beat RR, 1 Hz HR and steps per minute for
the same people in one file): the vectorised cleaning and day batches give exactly what the
straightforward reading gave (sort every sample by user, metric, time, drop duplicates, cut
into days), on small files the reference can afford."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MemoryTransport
from stresswatch.config import Settings
from stresswatch.consent.ledger import ConsentLedger
from stresswatch.detect import Detector
from stresswatch.model import METRICS, SAMPLES_SCHEMA
from stresswatch.pipeline import DataClock, Pipeline
from stresswatch.replay import InputReport, SampleBlock, iter_input_blocks, replay

T0 = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()) * 10**9
NS = 10**9


def reference_clean(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """The reading replay had before it was vectorised, kept as the oracle: a stable sort of
    every sample by user, metric, time; the first of each (user, metric, time) wins."""
    ordered = frame.sort("user", "metric", "time", maintain_order=True)
    key_same = (
        (pl.col("user") == pl.col("user").shift())
        & (pl.col("metric") == pl.col("metric").shift())
        & (pl.col("time") == pl.col("time").shift())
    ).fill_null(False)
    exact = key_same & (pl.col("value") == pl.col("value").shift()) & (pl.col("source") == pl.col("source").shift())
    flags = ordered.select(key_same.alias("dup"), exact.fill_null(False).alias("exact"))
    n_dup, n_exact = int(flags["dup"].sum()), int(flags["exact"].sum())
    dropped = {k: v for k, v in (("exact_duplicate", n_exact), ("conflicting_duplicate", n_dup - n_exact)) if v}
    return ordered.filter(~flags["dup"]), dropped


def reference_replay(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Windows and alerts of the reference reading fed a day at a time through the same
    pipeline objects as the replay (in-memory outbox, the data's clock, no consent)."""
    samples, _ = reference_clean(frame)
    day = pl.col("time").dt.epoch("s") // 86400
    batches = samples.with_columns(day.alias("_d")).sort("_d", maintain_order=True).partition_by("_d", maintain_order=True)
    clock = DataClock()
    settings = Settings()
    with Outbox(":memory:") as outbox, ConsentLedger(":memory:") as ledger:
        dispatcher = Dispatcher.from_settings(settings, outbox, ledger, MemoryTransport(), clock=clock)
        pipeline = Pipeline(Detector(settings.detector), dispatcher, keep_windows=True, keep_alerts=True, data_clock=clock)
        for batch in batches:
            batch = batch.drop("_d")
            clock.set_to_end_of(batch)
            pipeline.process(batch)
            pipeline.tick()
        clock.set(samples["time"].max())
        pipeline.finish()
    return pipeline.report.windows_frame(), pipeline.report.alerts_frame()


def mixed_export(users: int, days: float, seed: int, *, stressed: int | None = 0) -> pl.DataFrame:
    """Per-beat RR (a strap), HR once a second (a watch) and steps per minute (a phone) for
    the same people, sorted by time as an export of several devices would be; ``stressed``:
    a user with a 40-minute episode (faster heart, less variability) on the second day."""
    rng = np.random.default_rng(seed)
    span_s = int(days * 86400)
    parts = []
    for k in range(users):
        n = int(span_s / 0.85)
        rr = 900.0 + 40.0 * rng.standard_normal(n)
        t_s = np.cumsum(rr) / 1000.0
        if k == stressed:
            ep = (t_s > 86400 + 14 * 3600) & (t_s < 86400 + 14 * 3600 + 2400)
            rr[ep] = 760.0 + 12.0 * rng.standard_normal(int(ep.sum()))
            t_s = np.cumsum(rr) / 1000.0
        keep = t_s < span_s
        rr, t_ns = rr[keep], T0 + (t_s[keep] * NS).astype(np.int64)
        sec = np.arange(span_s, dtype=np.int64)
        hr = np.round(np.interp(T0 + sec * NS, t_ns, 60000.0 / rr))
        minute = np.arange(60, span_s, 60, dtype=np.int64)
        steps = rng.poisson(np.where((minute // 3600) % 24 < 7, 0.0, 3.0)).astype(float)
        user = f"u{k:02d}"
        for metric, tt, v, src in (
            ("rr_ms", t_ns, np.round(rr, 1), "strap"),
            ("hr_bpm", T0 + sec * NS, hr, "watch"),
            ("steps", T0 + minute * NS, steps, "phone"),
        ):
            parts.append(pl.DataFrame({"user": user, "time": tt, "metric": metric, "value": v, "source": src}))
    frame = pl.concat(parts).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC")))
    return frame.sort("time", maintain_order=True).select(list(SAMPLES_SCHEMA))


def with_duplicates(frame: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Re-sent rows (exact copies) and conflicting rows (same user, metric, time, other
    value), each inserted right after a random row, as a flaky upload gives."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(frame.height, 400, replace=False))
    copies = frame[rows[:300]]
    conflicts = frame[rows[300:]].with_columns(pl.col("value") + 1.0)
    extra = pl.concat([copies, conflicts]).with_columns(pl.Series("_at", np.concatenate([rows[:300], rows[300:]]) + 0.5))
    return (
        pl.concat([frame.with_row_index("_at").with_columns(pl.col("_at").cast(pl.Float64)), extra.select(["_at", *SAMPLES_SCHEMA])])
        .sort("_at", maintain_order=True)
        .drop("_at")
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    frame = with_duplicates(mixed_export(3, 2.0, seed=5), seed=6)
    path = tmp_path_factory.mktemp("mixed") / "mixed.parquet"
    frame.write_parquet(path, row_group_size=50_000)
    return path, frame


def test_mixed_file_gives_the_windows_and_alerts_of_the_reference_reading(mixed: tuple[Path, pl.DataFrame]):
    path, frame = mixed
    ref_windows, ref_alerts = reference_replay(frame)
    res = replay([path])
    assert res.windows.height == ref_windows.height > 0
    assert res.windows.equals(ref_windows)
    assert res.alerts.height >= 1  # the stressed user's episode: the comparison is not vacuous
    assert res.alerts.equals(ref_alerts)
    _, dropped = reference_clean(frame)
    assert res.summary["inputs"]["dropped"] == dropped == {"exact_duplicate": 300, "conflicting_duplicate": 100}
    assert res.summary["inputs"]["rows_read"] == frame.height
    assert res.summary["inputs"]["rows_kept"] == frame.height - 400


def test_mixed_file_read_whole_gives_the_reference_samples_in_order(mixed: tuple[Path, pl.DataFrame]):
    path, frame = mixed
    expected, _ = reference_clean(frame)
    report, blocks, n = iter_input_blocks([path], keep_source=True)
    got = [b.to_frame() for b in blocks]
    assert n == len(got) == 1
    assert got[0].equals(expected)


def test_each_day_batch_is_ordered_for_the_detector(mixed: tuple[Path, pl.DataFrame]):
    """Days in order; inside a day by user, time, and metric name for one user's time: the
    detector takes it without sorting, as it took the reference's (user, metric, time)."""
    _, frame = mixed
    block = SampleBlock(frame)
    days = [b.with_columns(pl.col("user", "metric").cast(pl.String)) for b in block.days()]
    assert len(days) == 2
    for b in days:
        assert b.equals(b.sort("user", "time", "metric", maintain_order=True))
        assert (b["time"].dt.epoch("s") // 86400).n_unique() == 1


samples_rows = st.lists(
    st.tuples(
        st.sampled_from(["ann", "bo", "cy"]),
        st.integers(0, 5),  # few distinct times: ties and duplicates are common
        st.sampled_from(METRICS),
        st.sampled_from([60.0, 61.0, 800.0, float("nan")]) | st.none(),
        st.sampled_from(["strap", "watch"]) | st.none(),
    ),
    max_size=60,
)


@given(rows=samples_rows, day_step=st.sampled_from([1, 3600, 43_200]))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_cleaning_matches_the_reference_on_any_samples(rows, day_step):
    """Any rows (duplicates, conflicts, nulls, NaN, ties across metrics, any order, one or
    several days): the cleaned samples and the dropped counts are the reference's."""
    frame = pl.DataFrame(
        {
            "user": [r[0] for r in rows],
            "time": [T0 + r[1] * day_step * NS for r in rows],
            "metric": [r[2] for r in rows],
            "value": [r[3] for r in rows],
            "source": [r[4] for r in rows],
        },
        schema={"user": pl.String, "time": pl.Int64, "metric": pl.String, "value": pl.Float64, "source": pl.String},
    ).with_columns(pl.col("time").cast(pl.Datetime("ns", "UTC")))
    expected, dropped = reference_clean(frame)
    report = InputReport()
    got = SampleBlock(frame, report, keep_source=True).to_frame()
    assert got.equals(expected, null_equal=True)
    assert report.dropped == dropped
    assert report.rows_kept == expected.height


def test_a_file_in_time_order_is_read_in_parts_with_the_same_results(mixed: tuple[Path, pl.DataFrame]):
    """Memory set by a part and a day of the file's users, not by the file: read 20,000 rows
    at a time, the windows, alerts and summary are those of the file read whole."""
    path, frame = mixed
    whole = replay([path], part_rows=10 * frame.height)
    parts = replay([path], part_rows=20_000)
    assert parts.windows.equals(whole.windows) and parts.alerts.equals(whole.alerts)
    assert parts.summary == whole.summary
    report, blocks, _ = iter_input_blocks([path], keep_source=True, part_rows=20_000)
    (block,) = list(blocks)
    assert block.to_frame().equals(reference_clean(frame)[0])
    day_rows = int((frame["time"].dt.epoch("s") // 86400).value_counts()["count"].max())
    assert 0 < block.peak_rows <= 20_000 + day_rows < frame.height


def test_files_in_time_order_are_read_in_parts_across_files(tmp_path: Path, mixed: tuple[Path, pl.DataFrame]):
    """One export split in two files by time: read in parts across them in the given order;
    given in the other order they overlap in time and are read whole and said to be unsorted,
    with the same samples either way."""
    _, frame = mixed
    half = frame.height // 2
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    frame[:half].write_parquet(first)
    frame[half:].write_parquet(second)
    expected, dropped = reference_clean(frame)
    day_rows = int((frame["time"].dt.epoch("s") // 86400).value_counts()["count"].max())
    for paths, streamed in (([first, second], True), ([second, first], False)):
        report, blocks, _ = iter_input_blocks(paths, keep_source=True, part_rows=30_000)
        (block,) = list(blocks)
        got = block.to_frame()
        assert block.peak_rows <= 30_000 + day_rows if streamed else block.peak_rows == frame.height
        assert report.dropped == dropped
        assert ("input was not in time order: sorted (results do not depend on input order)" in report.as_dict()["notes"]) is not streamed
        if streamed:
            assert got.equals(expected)
        else:  # files read whole: the second given is first in input order among duplicates
            assert got.drop("value", "source").equals(expected.drop("value", "source"))


def test_bad_row_in_a_later_part_is_named_by_its_row_in_the_file(tmp_path: Path, mixed: tuple[Path, pl.DataFrame]):
    from stresswatch.errors import ParseError

    _, frame = mixed
    bad = frame.with_columns(pl.when(pl.int_range(pl.len()) == 123_456).then(None).otherwise(pl.col("metric")).alias("metric"))
    path = tmp_path / "bad.parquet"
    bad.write_parquet(path)
    with pytest.raises(ParseError) as err:
        replay([path], part_rows=20_000)
    assert "row 123457" in str(err.value) and "metric" in str(err.value) and "bad.parquet" in str(err.value)
