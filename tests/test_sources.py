"""The source seam: registry discovery through entry points, and the samples-file adapter."""

import asyncio
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.errors import ParseError
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.sources import Source, SourceRegistry


def test_registry_finds_installed_adapters_without_importing_them_by_name():
    reg = SourceRegistry.discover()
    assert "samples" in reg.kinds


def test_open_by_suffix_and_unknown_suffix(tmp_path: Path, demo_cohort: Path):
    reg = SourceRegistry.discover()
    src = reg.open(demo_cohort)
    assert isinstance(src, Source)
    with pytest.raises(ParseError, match="no adapter"):
        reg.open(tmp_path / "x.bin")
    with pytest.raises(ParseError, match="unknown kind"):
        reg.open(demo_cohort, kind="nope")


async def _batches(src: Source) -> list[pl.DataFrame]:
    return [b async for b in src]


def test_parquet_source_yields_time_ordered_hourly_batches(demo_cohort: Path):
    batches = asyncio.run(_batches(SourceRegistry.discover().open(demo_cohort)))
    assert len(batches) == 48
    assert all(b.schema == pl.Schema(SAMPLES_SCHEMA) for b in batches)
    times = pl.concat(batches)["time"]
    assert times.is_sorted()


def test_csv_round_trip_and_line_numbers(tmp_path: Path):
    f = tmp_path / "s.csv"
    f.write_text(
        "user,time,metric,value,source\n"
        "a,2026-03-02T00:00:01Z,rr_ms,800,x\n"
        "a,2026-03-02T00:00:02Z,rr_ms,eight hundred,x\n"
    )
    with pytest.raises(ParseError) as err:
        asyncio.run(_batches(SourceRegistry.discover().open(f)))
    assert err.value.position == "line 3" and err.value.field == "value"
    assert "s.csv:line 3" in str(err.value)


def test_unknown_metric_names_row_and_field(tmp_path: Path):
    f = tmp_path / "s.csv"
    f.write_text("user,time,metric,value,source\na,2026-03-02T00:00:01Z,rr_ms,800,x\na,2026-03-02T00:00:02Z,spo2,97,x\n")
    with pytest.raises(ParseError) as err:
        asyncio.run(_batches(SourceRegistry.discover().open(f)))
    assert err.value.field == "metric" and err.value.position == "row 2"


def test_missing_column(tmp_path: Path):
    f = tmp_path / "s.csv"
    f.write_text("user,time,value,source\na,2026-03-02T00:00:01Z,800,x\n")
    with pytest.raises(ParseError, match="missing column"):
        asyncio.run(_batches(SourceRegistry.discover().open(f)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".parquet"]))
def test_arbitrary_bytes_raise_only_parse_error(tmp_path: Path, data: bytes, suffix: str):
    f = tmp_path / f"junk{suffix}"
    f.write_bytes(data)
    try:
        batches = asyncio.run(_batches(SourceRegistry.discover().open(f)))
    except ParseError:
        return
    for b in batches:  # if it parsed, it is in the samples schema
        assert b.schema == pl.Schema(SAMPLES_SCHEMA)
