"""The researcher's replay: deterministic outputs, input report, pseudonyms, plots, sweeps."""

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.errors import ParseError
from stresswatch.replay import read_labels, replay

OUTPUTS = ("windows.parquet", "alerts.parquet", "summary.json")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cohort(demo_cohort: Path) -> pl.DataFrame:
    return pl.read_parquet(demo_cohort)


def test_replaying_twice_gives_byte_identical_outputs(tmp_path: Path, demo_cohort: Path):
    for run in ("a", "b"):
        res = cli("replay", str(demo_cohort), "--out", str(tmp_path / run))
        assert res.returncode == 0, res.stderr
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_same_samples_in_other_files_and_order_give_identical_tables(tmp_path: Path, demo_cohort: Path, cohort: pl.DataFrame):
    one = replay([demo_cohort], out=tmp_path / "one")
    # per-user files, given in reverse order, rows shuffled, one as CSV
    paths = []
    for i, (user, part) in enumerate(sorted(cohort.partition_by("user", as_dict=True).items(), reverse=True)):
        p = tmp_path / f"{user[0]}.{'csv' if i == 0 else 'parquet'}"
        part = part.sample(fraction=1.0, shuffle=True, seed=i)
        if i == 0:
            part.with_columns(pl.col("time").dt.strftime("%Y-%m-%dT%H:%M:%S%.9fZ")).write_csv(p)
        else:
            part.write_parquet(p)
        paths.append(p)
    many = replay(paths, out=tmp_path / "many")
    for name in ("windows.parquet", "alerts.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    assert one.summary["windows_by_state"] == many.summary["windows_by_state"]
    shuffled = replay(cohort.sample(fraction=1.0, shuffle=True, seed=1))
    assert "not in time order" in " ".join(shuffled.summary["inputs"]["notes"])
    assert shuffled.windows.equals(one.windows) and shuffled.alerts.equals(one.alerts)


def test_duplicates_and_conflicts_are_reported_and_do_not_change_results(tmp_path: Path, cohort: pl.DataFrame):
    alice = cohort.filter(pl.col("user") == "alice")
    clean = replay(alice)
    conflicting = alice.head(50).with_columns(pl.col("value") + 1.0)
    dirty = pl.concat([conflicting.with_columns(pl.col("value") - 1.0), alice, alice.head(100)])
    res = replay(dirty)
    # the first of each (user, metric, time) wins: the re-sent copies are identical here
    assert res.summary["inputs"]["dropped"] == {"exact_duplicate": 150}
    assert res.windows.equals(clean.windows) and res.alerts.equals(clean.alerts)
    res2 = replay(pl.concat([alice, conflicting]))
    assert res2.summary["inputs"]["dropped"] == {"conflicting_duplicate": 50}
    assert res2.windows.equals(clean.windows)


def test_empty_file_is_reported_not_fatal(tmp_path: Path, demo_cohort: Path, cohort: pl.DataFrame):
    empty = tmp_path / "empty.parquet"
    cohort.head(0).write_parquet(empty)
    res = replay([demo_cohort, empty])
    assert res.summary["inputs"]["dropped"] == {"empty_file": 1}
    assert res.summary["alerts_raised"] == 2


def test_summary_records_what_shapes_results(tmp_path: Path, demo_cohort: Path):
    res = replay([demo_cohort], out=tmp_path)
    s = res.summary
    assert s["users"] == 4 and round(s["user_days"]) == 8
    assert s["alerts_raised"] == 2 and s["alerts_withheld"] == 2
    assert s["inputs"]["files"][0]["sha256"] and s["inputs"]["files"][0]["rows"] == 623729
    assert s["config"]["detector"]["window_s"] == 300
    assert sum(s["windows_by_state"].values()) == s["windows"]
    assert "password" not in (tmp_path / "summary.json").read_text()


def test_pseudonymise_leaves_no_user_id_in_any_output(tmp_path: Path, demo_cohort: Path):
    key = tmp_path / "key"
    key.write_text("a-secret-key")
    out = tmp_path / "share"
    res = cli("replay", str(demo_cohort), "--out", str(out), "--pseudonymise", "--pseudonym-key-file", str(key), "--plot")
    assert res.returncode == 0, res.stderr
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            if f.suffix == ".png":  # compressed pixels can hold any 3 bytes by chance: check the PNG's text
                from PIL import Image

                data = " ".join(Image.open(f).text.values()).encode()
            for user in (b"alice", b"bob", b"carol", b"dan"):
                assert user not in data, (f, user)
            assert not any(u in f.name for u in ("alice", "bob", "carol", "dan"))
    users = pl.read_parquet(out / "windows.parquet")["user"].unique().to_list()
    assert len(users) == 4 and all(u.startswith("p-") for u in users)
    again = tmp_path / "again"
    assert cli("replay", str(demo_cohort), "--out", str(again), "--pseudonymise", "--pseudonym-key-file", str(key)).returncode == 0
    assert (again / "windows.parquet").read_bytes() == (out / "windows.parquet").read_bytes()


def test_plot_writes_one_png_per_user(tmp_path: Path, demo_cohort: Path):
    res = cli("replay", str(demo_cohort), "--out", str(tmp_path), "--plot", "--labels", str(demo_cohort.with_name("demo_cohort_labels.csv")))
    assert res.returncode == 0, res.stderr
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["alice.png", "bob.png", "carol.png", "dan.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_labels_errors_name_line_and_field(tmp_path: Path):
    f = tmp_path / "labels.csv"
    f.write_text("user,start,end\nalice,2026-03-03T14:00:00Z,2026-03-03T14:45:00Z\nbob,yesterday,2026-03-03T14:45:00Z\n")
    with pytest.raises(ParseError) as err:
        read_labels(f)
    assert err.value.position == "line 3" and err.value.field == "start"
    f.write_text("user,start,end\nalice,2026-03-03T14:00:00Z,2026-03-03T13:45:00Z\n")
    with pytest.raises(ParseError, match="ends before it starts"):
        read_labels(f)
    labels = read_labels(Path(__file__).parent.parent / "fixtures" / "demo_cohort_labels.csv")
    assert labels["start"].dtype == pl.Datetime("ns", "UTC")
    assert labels.row(0, named=True)["start"] == datetime(2026, 3, 3, 14, tzinfo=timezone.utc)


def test_sweep_writes_one_row_per_value(tmp_path: Path, demo_cohort: Path):
    res = cli("replay", str(demo_cohort), "--out", str(tmp_path), "--set", "detector.cusum_h=6,500")
    assert res.returncode == 0, res.stderr
    table = pl.read_parquet(tmp_path / "sweep.parquet").sort("detector.cusum_h")
    assert table["detector.cusum_h"].to_list() == ["500", "6"]
    assert table["alerts_raised"].to_list() == [0, 2]  # (sorted as text) an absurd threshold raises nothing


def test_single_set_on_replay_overrides_settings(tmp_path: Path, demo_cohort: Path):
    res = cli("replay", str(demo_cohort), "--out", str(tmp_path), "--set", "detector.window_s=600")
    assert res.returncode == 0, res.stderr
    w = pl.read_parquet(tmp_path / "windows.parquet")
    assert ((w["window_end"] - w["window_start"]).dt.total_seconds() == 600).all()


def test_readme_python_example_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## Python API")[1].split("```python")[1].split("```")[0]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr


def test_labels_give_episode_metrics_per_user_and_overall(tmp_path: Path, demo_cohort: Path):
    res = cli("replay", str(demo_cohort), "--out", str(tmp_path), "--labels", str(demo_cohort.with_name("demo_cohort_labels.csv")))
    assert res.returncode == 0, res.stderr
    assert "evaluation against labels" in res.stdout
    ev = pl.read_parquet(tmp_path / "evaluation.parquet")
    overall = ev.filter(pl.col("user") == "ALL").row(0, named=True)
    # the demo's two labelled episodes (alice, carol) are each found once, with no false alert
    assert overall["episodes"] == 2 and overall["detected"] == 2 and overall["false_alerts"] == 0
    assert overall["recall"] == 1.0 and overall["precision"] == 1.0
    assert 0 < overall["median_delay_s"] <= 1800
    assert sorted(ev.filter(pl.col("user") != "ALL")["user"]) == ["alice", "bob", "carol", "dan"]
    import json

    assert json.loads((tmp_path / "summary.json").read_text())["evaluation"]["recall"] == 1.0


def test_files_sharing_a_user_are_read_together_and_others_alone(tmp_path: Path, cohort: pl.DataFrame):
    from stresswatch.replay import iter_input_blocks

    alice = cohort.filter(pl.col("user") == "alice")
    half = alice.height // 2
    paths = []
    for name, part in (("a2", alice[half:]), ("b", cohort.filter(pl.col("user") == "bob")), ("a1", alice[:half])):
        paths.append(tmp_path / f"{name}.parquet")
        part.write_parquet(paths[-1])
    report, blocks, n = iter_input_blocks(paths)
    assert n == 2 and [f["rows"] for f in report.files] == [None, None, None]  # planned, not read yet
    got = list(blocks)
    assert [b.users for b in got] == [("alice",), ("bob",)]
    frames = [b.to_frame() for b in got]  # cleaned as taken
    assert frames[0]["time"].is_sorted() and frames[0].height == got[0].height == alice.height
    assert report.rows_read == report.rows_kept == alice.height + frames[1].height
    whole = replay(cohort.filter(pl.col("user").is_in(["alice", "bob"])))
    assert replay(paths).windows.equals(whole.windows)
