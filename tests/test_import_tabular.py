"""Generic CSV/Parquet import with a column mapping."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch.store import SampleStore
from stresswatch_adapters.tabular import MappedTableSource

TAB = Path(__file__).resolve().parent.parent / "fixtures" / "tabular"
UTC = timezone.utc


def load(path: Path, **options: object) -> tuple[pl.DataFrame, MappedTableSource]:
    src = MappedTableSource(path, user="gus", **options)
    return pl.concat(list(src.batches())), src


def test_watch_export_epoch_ms_tab_separated_with_zero_hr_rejected():
    got, src = load(TAB / "watch_hrm.tsv", mapping={"time": "timestamp", "value": "hrm"}, metric="hr_bpm")
    raw = pl.read_csv(TAB / "watch_hrm.tsv", separator="\t")
    assert got.height == raw.filter(pl.col("hrm") > 0).height
    assert src.report.rejected == {"table: heart rate outside 20-250 bpm": raw.filter(pl.col("hrm") == 0).height}
    first_kept = raw.filter(pl.col("hrm") > 0)["timestamp"][0]
    assert got["time"][0] == datetime.fromtimestamp(first_kept / 1000, UTC)  # exact ms, no float drift
    assert got["time"][0].microsecond % 1000 == 0


def test_csv_with_metric_column_and_local_times():
    got, src = load(TAB / "mapped.csv", mapping={"time": "when", "value": "bpm", "metric": "kind"}, tz="Europe/Paris")
    assert got.select("metric", "value").rows() == [("hr_bpm", 61.0), ("hr_bpm", 62.5), ("rr_ms", 812.0)]
    assert got["time"][0] == datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)
    assert src.report.rejected == {
        "table: value is empty or not a number": 1,
        "table: time is empty or does not parse": 1,
        "table: metric is not one of hr_bpm, rr_ms, steps, motion": 1,
        "table: heart rate outside 20-250 bpm": 1,
    }


def test_parquet_with_mapping(tmp_path: Path):
    f = tmp_path / "x.parquet"
    pl.DataFrame({"t": [1_700_000_000, 1_700_000_001], "rr": [800, 810]}).write_parquet(f)
    got, _ = load(f, mapping={"time": "t", "value": "rr"}, metric="rr_ms")
    assert got["time"].to_list() == [datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC)]


def test_missing_column_names_it_and_lists_the_columns():
    with pytest.raises(ParseError) as err:
        load(TAB / "mapped.csv", mapping={"time": "timestamp", "value": "bpm"}, metric="hr_bpm")
    assert err.value.field == "timestamp" and "when, bpm, kind" in err.value.message


def test_no_metric_is_an_error():
    with pytest.raises(ParseError, match="which metric"):
        load(TAB / "mapped.csv", mapping={"time": "when", "value": "bpm"})


def test_store_round_trip(tmp_path: Path):
    got, _ = load(TAB / "mapped.csv", mapping={"time": "when", "value": "bpm", "metric": "kind"})
    store = SampleStore(tmp_path)
    assert store.add(got).added == 3
    assert store.add(got).added == 0
