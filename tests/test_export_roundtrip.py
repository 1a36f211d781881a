"""`stresswatch export` writes what `stresswatch import openmhealth` reads back as is."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.cli import main
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.store import SampleStore

T0 = int(datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc).timestamp() * 1e9)


def samples(user: str, rows: list[tuple[int, str, float, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user": [user] * len(rows),
            "time": pl.Series([T0 + r[0] for r in rows]).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "source": [r[3] for r in rows],
        },
        schema=SAMPLES_SCHEMA,
    )


def roundtrip(tmp_path, frame: pl.DataFrame, capsys) -> tuple[pl.DataFrame, pl.DataFrame]:
    a, b = tmp_path / "a", tmp_path / "b"
    SampleStore(a).add(frame)
    out = tmp_path / "alice-export.json"
    assert main(["--set", f"store.state_dir={a}", "export", "--user", "alice", "--out", str(out)]) == 0
    rc = main(["--set", f"store.state_dir={b}", "import", "openmhealth", str(out), "--user", "alice"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return SampleStore(a).read("alice"), SampleStore(b).read("alice")


def test_export_imports_back_as_the_same_samples(tmp_path, capsys):
    frame = samples(
        "alice",
        [
            (0, "hr_bpm", 61.0, "fit"),
            (1_000_000, "rr_ms", 812.5, "ble/polar-h10"),
            (1_812_500_001, "rr_ms", 799.25, "ble/polar-h10"),  # nanoseconds survive
            (60_000_000_000, "steps", 12.0, "apple_health/watch"),  # no OMH schema: a plain row
            (61_000_000_000, "motion", 0.25, "ble/polar-h10"),
        ],
    )
    before, after = roundtrip(tmp_path, frame, capsys)
    assert after.equals(before)
    doc = json.loads((tmp_path / "alice-export.json").read_text())
    assert len(doc["samples"]) == 3 and len(doc["other_samples"]) == 2


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10**15),
            st.sampled_from(["hr_bpm", "rr_ms"]),
            st.floats(300, 2000, allow_nan=False).map(lambda v: round(v, 3)),
            st.sampled_from(["fit", "ble/h10", "openmhealth"]),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_any_heart_samples_survive_export_and_import(tmp_path_factory, capsys, rows):
    rows = [(t, m, v if m == "rr_ms" else min(v / 10, 240.0), s) for t, m, v, s in rows]
    before, after = roundtrip(tmp_path_factory.mktemp("rt"), samples("alice", rows), capsys)
    assert after.equals(before)
