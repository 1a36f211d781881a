"""Garmin FIT import: committed fixtures built with our FIT encoder, checked sample by sample."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.sources import SourceRegistry
from stresswatch_adapters.fit import FitSource, decode_fit

FIT = Path(__file__).resolve().parent.parent / "fixtures" / "fit"
_spec = importlib.util.spec_from_file_location("fitenc", FIT / "fitenc.py")
assert _spec and _spec.loader
fitenc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fitenc)


def imported(path: Path) -> tuple[pl.DataFrame, FitSource]:
    src = SourceRegistry.discover().open(path, kind="fit", user="alice")
    assert isinstance(src, FitSource)
    return pl.concat(list(src.batches())).sort("time", "metric"), src


def expected(name: str) -> pl.DataFrame:
    return pl.read_csv(FIT / f"{name}.expected.csv").sort("time_ns", "metric")


@pytest.mark.parametrize("name", ["activity", "hr_beats", "monitoring"])
def test_fixture_imports_exactly_the_samples_it_was_built_from(name: str):
    got, src = imported(FIT / f"{name}.fit")
    exp = expected(name)
    assert got.schema == pl.Schema(SAMPLES_SCHEMA)
    assert got["metric"].to_list() == exp["metric"].to_list()
    # beat times are sums of 1/1000 s or 1/1024 s steps: equal to the microsecond
    assert np.abs(got["time"].dt.epoch("ns").to_numpy() - exp["time_ns"].to_numpy()).max() <= 1000
    assert np.allclose(got["value"].to_numpy(), exp["value"].to_numpy(), atol=1e-3)
    assert set(got["user"]) == {"alice"}
    assert src.report.read == src.report.kept + src.report.n_rejected


def test_hrv_beats_resume_after_a_pause_at_the_next_record_not_in_the_past():
    got, src = imported(FIT / "activity.fit")
    rr = got.filter(pl.col("metric") == "rr_ms")
    t_s = rr["time"].dt.epoch("ns").to_numpy() / 1e9 - 1_780_000_000
    assert not ((t_s > 60) & (t_s < 80)).any()  # the strap-off gap stays a gap
    assert t_s[t_s > 60].min() > 80
    assert src.report.rejected == {"fit record: invalid heart rate (0xFF)": 1}


def test_monitoring_timestamp_16_rolls_over_past_18_hours():
    got, _ = imported(FIT / "monitoring.fit")
    span_h = (got["time"].max() - got["time"].min()).total_seconds() / 3600
    assert span_h == 20.0
    assert got["time"].is_sorted() and got["time"].n_unique() == got.height


def test_source_names_the_device_from_file_id():
    got, _ = imported(FIT / "hr_beats.fit")
    assert set(got["source"]) == {"fit/garmin/fr745"}  # product 3589, named by the FIT profile


def test_folder_and_zip_give_the_same_samples_as_the_files(tmp_path: Path):
    one = pl.concat([imported(FIT / f"{n}.fit")[0] for n in ("activity", "hr_beats", "monitoring")]).sort("time", "metric")
    folder, _ = imported(FIT)
    assert folder.equals(one)
    z = tmp_path / "garmin-export.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for n in ("activity", "hr_beats", "monitoring"):
            zf.write(FIT / f"{n}.fit", f"DI_CONNECT/DI-Connect-Uploaded-Files/{n}.fit")
        zf.writestr("DI_CONNECT/readme.txt", "not a fit file")
    zipped, _ = imported(z)
    assert zipped.equals(one)


def test_truncated_file_names_file_and_byte_offset():
    data = (FIT / "activity.fit").read_bytes()
    with pytest.raises(ParseError) as err:
        decode_fit(data[: len(data) // 2], source="cut.fit")
    assert err.value.source == "cut.fit"
    assert "byte" in str(err.value.position)


def test_corrupt_crc_is_an_error_not_data():
    data = bytearray((FIT / "hr_beats.fit").read_bytes())
    data[40] ^= 0x01
    with pytest.raises(ParseError, match="corrupt"):
        decode_fit(bytes(data), source="x.fit")


def test_wrong_kind_and_unknown_protocol_version():
    with pytest.raises(ParseError, match="not a FIT file"):
        decode_fit(b'{"json": "not fit"}', source="x.fit")
    w = fitenc.FitWriter(protocol_version=0x30)
    w.define(0, 20, [(253, 1, fitenc.UINT32), (3, 1, fitenc.UINT8)])
    w.data(0, [1_000_000_000, 60])
    with pytest.raises(ParseError, match="unsupported FIT protocol version 3"):
        decode_fit(w.to_bytes(), source="future.fit")


def test_hrv_unused_slots_and_rr_before_any_timestamp():
    w = fitenc.FitWriter()
    w.define(0, 78, [(0, 5, fitenc.UINT16)])
    w.define(1, 20, [(253, 1, fitenc.UINT32), (3, 1, fitenc.UINT8)])
    w.data(0, [[800, 810]])  # before any timestamp: cannot be placed in time
    w.data(1, [1_100_000_000, 72])
    w.data(0, [[790, None, None, None, None]])  # 0xFFFF slots are padding, not beats
    s = decode_fit(w.to_bytes())
    assert s.rr_ms.tolist() == [790.0]
    assert (s.rr_time_ns[0] - (1_100_000_000 + 631065600) * 10**9) == 790_000_000
    assert dict(s.rejected) == {"fit hrv: RR before any timestamp": 2}
