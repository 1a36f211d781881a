"""`stresswatch export` and `stresswatch erase` as a user runs them, against a real engine,
a real Mosquitto and the real stores (SQLite ledger and outbox, Parquet samples)."""

import json
import os
import sqlite3
import subprocess
import sys
import time

from stresswatch.alerts import WorkerClient
from stresswatch.alerts.lifecycle import Outcome
from stresswatch.alerts.outbox import Outbox
from stresswatch.engine.persist import stored_detector
from stresswatch.store import SampleStore

from test_engine import TOPICS, publish_stream, retained, settings_for, start_engine, wait_for


def cli(state, *args):
    env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def rows(db, sql, *params):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_export_then_erase_everywhere(mosquitto, tmp_path, rr_stream):
    url, state = mosquitto.url, tmp_path / "state"
    db = state / "stresswatch.sqlite"
    # companion and engine on one machine, one state dir: the consent arrives twice (file and
    # retained topic) and is stored once
    h = (time.gmtime().tm_hour + 6) % 24  # quiet hours that do not hold now, whenever the test runs
    quiet = f"{h:02d}:00-{(h + 1) % 24:02d}:00"
    for user in ("alice", "bob"):
        res = cli(state, "consent", "grant", "--user", user, "--to", "sam", "--yes", "--quiet", quiet, "--tz", "Europe/London", "--broker", url)
        assert res.returncode == 0, res.stderr
    sam = WorkerClient(url, "sam", lambda a: None)
    eng, th = start_engine(settings_for(url, state), url)
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    publish_stream(url, rr_stream("alice", start_s, 2, seed=1))
    publish_stream(url, rr_stream("bob", start_s, 1, seed=2))
    assert wait_for(lambda: len(sam.received) == 3)
    alice_alerts = {r[0] for r in rows(db, "SELECT alert_id FROM alerts WHERE user = 'alice'")}
    first = next(a.alert_id for a in sam.received if a.alert_id in alice_alerts)
    sam.resolve(first, Outcome.REACHED_OUT, note="talked")
    assert wait_for(lambda: rows(db, "SELECT state FROM alerts WHERE alert_id = ?", first) == [("resolved",)])
    eng.request_stop()
    th.join(90)
    assert not th.is_alive()  # shut down: state and buffered samples saved

    out = tmp_path / "alice.json"
    res = cli(state, "export", "--user", "alice", "--out", str(out))
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["user"] == "alice" and doc["schema_version"] == 1
    assert [e["action"] for e in doc["consent_history"]] == ["grant"]  # stored once, not twice
    v = doc["consent_history"][0]["text_version"]
    assert doc["consent_texts"][v] and doc["consent_history"][0]["quiet_hours"] == f"{quiet} Europe/London"
    assert doc["consent_history"][0]["timezone"] == "Europe/London"  # --tz: the person's own zone, stored with the grant
    assert {a["alert_id"] for a in doc["alerts"]} == alice_alerts
    resolved = next(a for a in doc["alerts"] if a["alert_id"] == first)
    assert (resolved["outcome"], resolved["note"], resolved["acknowledged_by"]) == ("reached_out", "talked", "sam")
    assert [h["kind"] for h in resolved["history"]][-1] == "resolved"
    stored = SampleStore(state).count("alice")
    assert stored > 0 and len(doc["samples"]) == stored
    assert doc["samples_format"] == "openmhealth"
    assert {p["header"]["schema_id"]["name"] for p in doc["samples"]} == {"rr-interval"}
    assert "bob" not in out.read_text()

    # erase while the engine runs: it sees the consent topic cleared and erases its copy too
    eng, th = start_engine(settings_for(url, state), url)
    res = cli(state, "erase", "--user", "alice", "--yes", "--broker", url)
    assert res.returncode == 0, res.stderr
    assert wait_for(lambda: retained(mosquitto.port, TOPICS.consent("alice"), timeout=0.5) is None)
    time.sleep(1.0)
    eng.request_stop()
    th.join(90)
    assert not th.is_alive()
    assert rows(db, "SELECT COUNT(*) FROM consent_events WHERE user = 'alice'") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM alerts WHERE user = 'alice'") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM alert_events WHERE user = 'alice'") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM deliveries WHERE alert_id IN (%s)" % ",".join("?" * len(alice_alerts)), *alice_alerts) == [(0,)]
    assert SampleStore(state).users() == ["bob"]
    with Outbox(db) as ob:
        assert stored_detector(ob).users == ["bob"]
    # what is kept is a tombstone without identity
    tombs = rows(db, "SELECT * FROM erasure_tombstones")
    assert tombs and "alice" not in repr(tombs)
    assert retained(mosquitto.port, TOPICS.status("alice"), timeout=0.5) is None
    # bob is untouched
    assert rows(db, "SELECT COUNT(*) FROM consent_events WHERE user = 'bob'") == [(1,)]
    assert SampleStore(state).count("bob") > 0
    # and the ledger still refuses deletion outside erasure
    con = sqlite3.connect(db)
    try:
        con.execute("DELETE FROM consent_events WHERE user = 'bob'")
        raise AssertionError("deleted a consent row outside erasure")
    except sqlite3.DatabaseError as exc:
        assert "append-only" in str(exc)
    finally:
        con.close()
    sam.close()
