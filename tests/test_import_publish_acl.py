"""`stresswatch import --publish` against the project's broker (real Mosquitto, generated
ACL): --user filters a multi-user samples file, and a refused batch stops the import at
once, naming the topic."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest

from stresswatch.cli import main
from stresswatch.ingest import IngestBatch
from engine_harness import engine_settings, running_engine
from test_broker_security import Inbox

P = "stresswatch/v1"
ENGINE = "stresswatch-engine"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def two_users_file(tmp_path: Path) -> Path:
    cohort = pl.read_parquet(FIXTURES / "demo_cohort.parquet")
    frame = pl.concat([cohort.filter(pl.col("user") == "alice").head(3000), cohort.filter(pl.col("user") == "bob").head(2000)])
    path = tmp_path / "two.parquet"
    frame.write_parquet(path)
    return path


def _url(b, account: str, password: str | None = None) -> str:
    return f"mqtt://{account}:{password or b.passwords[account]}@127.0.0.1:{b.port}"


def test_user_filters_a_multi_user_file_and_only_that_users_rows_are_published(secure_broker, two_users_file, capsys):
    b = secure_broker
    engine = Inbox(b.url, ENGINE, b.passwords[ENGINE], [f"{P}/ingest/+"])
    try:
        started = time.monotonic()
        rc = main(["--set", f"mqtt.url={_url(b, 'alice')}", "import", "samples", str(two_users_file), "--user", "alice", "--publish", "--trust-broker", "--no-progress"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert time.monotonic() - started < 20
        assert "imported only alice's rows; left out 2,000 row(s) of 1 other user(s)" in err
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(IngestBatch.decode(p).to_frame().height for p in engine.payloads()) < 3000:
            time.sleep(0.05)
    finally:
        engine.close()
    assert {t for t, _ in engine.messages} == {f"{P}/ingest/alice"}
    assert sum(IngestBatch.decode(p).to_frame().height for p in engine.payloads()) == 3000


def test_a_user_absent_from_the_file_is_one_clear_error(two_users_file, tmp_path, capsys):
    rc = main(["import", "samples", str(two_users_file), "--user", "carol", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 65 and "no rows of user 'carol'" in err and "alice, bob" in err


def test_a_refused_publish_stops_the_import_at_once_naming_topic_and_user(secure_broker, two_users_file, capsys):
    b = secure_broker
    started = time.monotonic()
    # bob's account cannot write alice's ingest topic
    rc = main(["--set", f"mqtt.url={_url(b, 'bob')}", "import", "samples", str(two_users_file), "--user", "alice", "--publish", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 69, err
    assert time.monotonic() - started < 20
    line = [ln for ln in err.splitlines() if ln.startswith("stresswatch: error:")]
    assert len(line) == 1 and f"{P}/ingest/alice" in line[0] and "user alice" in line[0]
    assert b.passwords["bob"] not in err  # the URL's password is never printed


def test_publish_ends_only_once_the_engine_confirms_storing_every_batch(secure_broker, two_users_file, tmp_path, capsys):
    """As for the companion, the ingest broker's PUBACK is not enough (it saves every minute):
    without an engine the import fails saying so, and running it again once the engine is up
    ends with every batch confirmed (the copies it already had confirmed too)."""
    b = secure_broker
    args = ["--set", f"mqtt.url={_url(b, 'alice')}", "import", "samples", str(two_users_file), "--user", "alice", "--publish", "--no-progress"]
    started = time.monotonic()
    rc = main([*args, "--confirm-timeout", "1.5"])
    out, err = capsys.readouterr()
    assert rc == 69, err
    assert time.monotonic() - started < 20
    line = [ln for ln in err.splitlines() if ln.startswith("stresswatch: error:")]
    assert len(line) == 1 and "1 of 1 batch(es) were accepted by the broker but no engine confirmed" in line[0]
    assert f"{P}/ingested/alice" in line[0] and "Running the same import again is safe" in line[0]
    assert b.passwords["alice"] not in err

    with running_engine(engine_settings(b, tmp_path / "state")) as eng:
        rc = main(args)
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "3,000 samples in 1 message(s)" in out and "stored by the engine (confirmed)" in out
        assert eng.stats().accepted == 1
        assert main(args) == 0  # the same import again: the engine drops the copy and confirms it
        capsys.readouterr()
        assert eng.stats().accepted == 1 and eng.stats().duplicates == 1
