"""The stores the engine keeps are private to its account, and the consent ledger reads back
what it stored even when a row is damaged (skipped and reported, never a crash)."""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest

from stresswatch.alerts.outbox import Outbox
from stresswatch.consent import ConsentLedger, Status
from stresswatch.consent.state import ConsentEvent, Action
from stresswatch.errors import ConsentError
from stresswatch.store import SampleStore

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_private(root: Path) -> None:
    for name, mode in modes(root).items():
        path = root / name
        want = 0o700 if path.is_dir() else 0o600
        assert mode == want, f"{name}: {oct(mode)} (want {oct(want)})"


def test_sqlite_stores_and_parquet_samples_are_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # the common default, which left them 0644
    try:
        state = tmp_path / "state"
        with ConsentLedger(state / "stresswatch.sqlite") as ledger, Outbox(state / "stresswatch.sqlite"):
            ledger.grant("alice", ["sam"], now=NOW)
            assert (state / "stresswatch.sqlite-wal").exists() and (state / "stresswatch.sqlite-shm").exists()
            SampleStore(state).add(
                pl.DataFrame({"user": ["alice"], "time": [NOW], "metric": ["hr_bpm"], "value": [60.0], "source": ["t"]})
            )
            assert list((state / "samples").rglob("*.parquet"))
            assert_private(state)
    finally:
        os.umask(old)


def test_files_an_older_version_left_readable_are_tightened_on_open(tmp_path):
    db = tmp_path / "s" / "stresswatch.sqlite"
    with ConsentLedger(db):
        pass
    for p in db.parent.iterdir():
        os.chmod(p, 0o644)
    with ConsentLedger(db) as ledger:
        ledger.grant("alice", ["sam"], now=NOW)
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(f"{db}-wal").stat().st_mode) == 0o600


def test_the_ledger_skips_and_reports_stored_rows_it_cannot_read(tmp_path, caplog):
    path = tmp_path / "ledger.sqlite"
    with ConsentLedger(path) as ledger:
        ledger.grant("alice", ["sam"], now=NOW - timedelta(days=1))
    con = sqlite3.connect(path)
    cols = "(user, action, at, via, text_version, recipients, visibility, event_id)"
    # written by an older version or by hand: an unreadable time, recipients that are not ids
    con.execute(f"INSERT INTO consent_events {cols} VALUES ('alice', 'grant', 'not a time', 'cli', 'v', '[\"kim\"]', 'reach_out', 'e2')")
    con.execute(f"INSERT INTO consent_events {cols} VALUES ('alice', 'grant', ?, 'cli', 'v', '[\"#\", \"kim/x\", \"\", \"kim\"]', 'reach_out', 'e3')", (NOW.isoformat(),))
    con.execute(f"INSERT INTO consent_events {cols} VALUES ('alice', 'pause', ?, 'cli', 'v', 'not json', 'reach_out', 'e4')", (NOW.isoformat(),))
    con.commit()
    con.close()
    with ConsentLedger(path) as ledger:
        st = ledger.state("alice")
        ledger.state("alice")
        assert st.status is Status.ACTIVE and st.recipients == ("kim",)  # e3 without its invalid recipients
        assert sorted(ledger.skipped) == [2, 3, 4]
    assert len([r for r in caplog.records if "stored event" in r.getMessage()]) == 3  # once each


def test_a_time_the_ledger_cannot_store_is_a_consent_error_not_overflow(tmp_path):
    far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14)))
    with ConsentLedger(tmp_path / "l.sqlite") as ledger, pytest.raises(ConsentError):
        ledger.append(ConsentEvent("alice", Action.GRANT, far, "cli", recipients=("sam",)))
