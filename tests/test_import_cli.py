"""`stresswatch import`: through the real CLI into real Parquet files (and a real Mosquitto)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import polars as pl
import pytest
from click.testing import CliRunner

from stresswatch.cli import cli, main
from stresswatch.ingest import IngestBatch
from stresswatch.store import SampleStore

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def run(*args: str) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(cli, list(args), standalone_mode=False, catch_exceptions=True)
    code = 0
    if result.exception is not None:
        from stresswatch.errors import StresswatchError

        if not isinstance(result.exception, StresswatchError):
            raise result.exception
        code = result.exception.exit_code
    return code, result.stdout, result.stderr


def test_import_fit_stores_samples_and_reports_counts(tmp_path: Path):
    code, out, _ = run("import", "fit", str(FIXTURES / "fit" / "activity.fit"), "--user", "alice", "--out", str(tmp_path), "--no-progress")
    assert code == 0
    assert "read" in out and "221" in out and "220" in out  # 221 read, 220 kept
    assert "fit record: invalid heart rate (0xFF)" in out
    stored = SampleStore(tmp_path).read("alice")
    assert stored.height == 220
    assert set(stored["metric"]) == {"hr_bpm", "rr_ms"}


def test_importing_the_same_export_twice_adds_nothing(tmp_path: Path):
    args = ("import", "fitbit", str(FIXTURES / "fitbit" / "export"), "--user", "bob", "--out", str(tmp_path), "--tz", "Europe/Berlin")
    run(*args)
    store = SampleStore(tmp_path)
    first = store.read("bob")
    files = {p: p.read_bytes() for p in store.files()}
    code, out, _ = run(*args)
    assert code == 0
    assert store.read("bob").equals(first)
    assert {p: p.read_bytes() for p in store.files()} == files
    assert "already stored" in out


def test_a_bad_file_in_an_export_stores_nothing_and_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.fit").write_bytes((FIXTURES / "fit" / "activity.fit").read_bytes())
    data = (FIXTURES / "fit" / "hr_beats.fit").read_bytes()
    (export / "b.fit").write_bytes(data[:-30])  # truncated: read after a.fit was parsed
    store_root = tmp_path / "store"
    SampleStore(store_root).add(pl.read_parquet(FIXTURES / "demo_cohort.parquet").head(5))
    before = {p: p.read_bytes() for p in (store_root / "samples").rglob("*.parquet")}
    code = main(["import", "fit", str(export), "--user", "alice", "--out", str(store_root), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 65
    assert err.count("\n") == 1 and "b.fit" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in (store_root / "samples").rglob("*.parquet")} == before
    assert not list((store_root / "samples" / ".staging").glob("*"))


def test_wrong_kind_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["import", "apple_health", str(FIXTURES / "openmhealth" / "points.json"), "--user", "a", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 65 and "malformed XML" in err and "line 1" in err
    assert "points.json" in err
    code = main(["import", "nope", str(FIXTURES / "openmhealth" / "points.json"), "--user", "a", "--out", str(tmp_path)])
    assert code == 65 and "unknown kind 'nope'" in capsys.readouterr().err
    assert SampleStore(tmp_path).users() == []


def test_unknown_time_zone_and_bad_map_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["import", "fitbit", str(FIXTURES / "fitbit" / "export"), "--user", "a", "--out", str(tmp_path), "--tz", "Mars/Olympus"])
    assert code != 0 and "--tz" in capsys.readouterr().err
    code = main(["import", "table", str(FIXTURES / "tabular" / "mapped.csv"), "--user", "a", "--out", str(tmp_path), "--map", "time"])
    assert code != 0 and "--map" in capsys.readouterr().err


def test_import_help_has_examples():
    code, out, _ = run("import", "--help")
    assert code == 0 and "Examples:" in out and "--publish" in out


@pytest.mark.mosquitto
def test_publish_sends_ingest_batches_that_rebuild_the_samples_and_resend_identically(mosquitto, tmp_path: Path):
    received: list[tuple[str, bytes]] = []
    got_all = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
    sub.on_message = lambda c, u, m: received.append((m.topic, m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("sw/ingest/#", qos=1)
    sub.loop_start()
    try:
        import time

        time.sleep(0.3)
        args = ["--set", f"mqtt.url={mosquitto.url}", "--set", "mqtt.prefix=sw", "import", "fit", str(FIXTURES / "fit" / "hr_beats.fit"), "--user", "carol", "--publish", "--trust-broker", "--no-progress"]  # no engine here
        assert main(args) == 0
        assert main(args) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(received) < 2:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert {t for t, _ in received} == {"sw/ingest/carol"}
    batches = [IngestBatch.decode(p) for _, p in received]
    assert len(batches) == 2
    assert (batches[0].stream_id, batches[0].seq) == (batches[1].stream_id, batches[1].seq)  # engine dedupes the resend
    frame = batches[0].to_frame().sort("time", "metric")
    exp = pl.read_csv(FIXTURES / "fit" / "hr_beats.expected.csv")
    assert frame.height == exp.height
    assert not (tmp_path / "samples").exists()
    assert json.loads(received[0][1])["user"] == "carol"


@pytest.mark.mosquitto
def test_publish_sends_only_what_the_engines_boundary_accepts(mosquitto, tmp_path: Path):
    """A stored sample the wire boundary refuses (a time before 2000, a non-finite value) is left
    out of the batches instead of failing the whole publish with a validation traceback."""
    import time
    from datetime import datetime, timezone

    from stresswatch.config import Settings
    from stresswatch.cli.imports import publish_store

    received: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub-bounds")
    sub.on_message = lambda c, u, m: received.append(m.payload)
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("stresswatch/v1/ingest/#", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.3)
        ok = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
        store = SampleStore(tmp_path / "store")
        store.add(pl.DataFrame({
            "user": ["carol"] * 4,
            "time": [ok, ok.replace(minute=1), datetime(1999, 12, 31, tzinfo=timezone.utc), ok.replace(minute=2)],
            "metric": ["hr_bpm", "steps", "hr_bpm", "hr_bpm"],
            "value": [61.0, float("nan"), 62.0, 63.0],
            "source": ["t"] * 4,
        }))  # fmt: skip
        publish_store(store, Settings.model_validate({"mqtt": {"url": mosquitto.url}}), kind="table", confirm_timeout_s=None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not received:
            time.sleep(0.05)
    finally:
        sub.loop_stop()
        sub.disconnect()
    batches = [IngestBatch.decode(p) for p in received]
    assert sorted(v for b in batches for v in b.value) == [61.0, 63.0]


def _row(out: str, name: str) -> list[str]:
    """The cells of the summary row whose first cell is ``name`` (rich box table)."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{out}")


def test_summary_shows_read_kept_rejected_new_and_already_stored_per_metric(tmp_path: Path):
    args = ("import", "fitbit", str(FIXTURES / "fitbit" / "export"), "--user", "bob", "--out", str(tmp_path), "--tz", "Europe/Berlin")
    code, out, _ = run(*args)
    assert code == 0
    assert _row(out, "hr_bpm") == ["12", "6", "6", "6", "0"]  # read, kept, rejected, new, already stored
    assert _row(out, "rmssd summary") == ["3", "0", "3", "0", "0"]
    assert _row(out, "all") == ["15", "6", "9", "6", "0"]
    code, out, _ = run(*args)
    assert _row(out, "hr_bpm") == ["12", "6", "6", "0", "6"]
    # a samples file has no adapter report: read and kept still shown, per metric
    code, out, _ = run("import", "samples", str(FIXTURES / "demo_cohort.parquet"), "--user", "bob", "--out", str(tmp_path / "s"))
    assert code == 0
    assert _row(out, "steps") == ["30", "30", "0", "30", "0"]


def test_the_same_file_with_another_time_zone_is_refused_and_never_doubles_the_data(tmp_path: Path):
    export = FIXTURES / "fitbit" / "export"
    args = ("import", "fitbit", str(export), "--user", "bob", "--out", str(tmp_path))
    assert run(*args, "--tz", "Europe/Berlin")[0] == 0
    before = SampleStore(tmp_path).read("bob")
    code, out, err = run(*args, "--tz", "America/New_York")
    assert code == 78
    assert SampleStore(tmp_path).read("bob").equals(before)
    # the same file zipped under another name is the same file
    import zipfile

    zipped = tmp_path / "renamed.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in export.rglob("*"):
            if f.is_file():
                zf.write(f, f"other/{f.name}")
    assert run("import", "fitbit", str(zipped), "--user", "bob", "--out", str(tmp_path))[0] == 78
    assert SampleStore(tmp_path).read("bob").equals(before)
    # the same options again: allowed, adds nothing, says so
    code, out, _ = run(*args, "--tz", "Europe/Berlin")
    assert code == 0 and _row(out, "all")[3:] == ["0", "6"]
    assert SampleStore(tmp_path).read("bob").equals(before)


def test_a_refused_reimport_names_the_file_and_both_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    f = FIXTURES / "fitbit" / "export"
    assert main(["import", "fitbit", str(f), "--user", "bob", "--out", str(tmp_path), "--tz", "Europe/Berlin"]) == 0
    capsys.readouterr()
    assert main(["import", "fitbit", str(f), "--user", "bob", "--out", str(tmp_path)]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused, nothing stored" in err and "--tz Europe/Berlin" in err and "--tz UTC" in err
