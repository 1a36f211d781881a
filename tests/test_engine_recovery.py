"""At-least-once delivery across failures, through a real Mosquitto: the broker stopped
(SIGTERM) or killed (SIGKILL) mid-stream, and the engine process killed mid-stream. After
recovery every alert the engine raised reaches the worker, and each id appears at most once
in the worker's view."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from stresswatch.alerts import WorkerClient

from conftest import FAST_DETECTOR
from test_engine import TOPICS, publish_consent, publish_stream, retained, settings_for, start_engine, wait_for

USERS = [f"u{i}" for i in range(6)]
CYCLES = 4  # alerts per user


def raised_ids(db) -> set[str]:
    if not db.exists():
        return set()
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT alert_id FROM alerts WHERE state NOT IN ('withheld', 'suppressed')")}
    except sqlite3.OperationalError:
        return set()
    finally:
        con.close()


def streams(rr_stream, start_s):
    return [rr_stream(u, start_s, CYCLES, seed=i) for i, u in enumerate(USERS)]


def halves(frame):
    cut = frame.item(frame.height // 2, "time")
    # cut on a window boundary so no window is split between the halves
    cut_s = int(cut.timestamp()) // 60 * 60
    import polars as pl

    t = pl.col("time").dt.epoch("s")
    return frame.filter(t < cut_s), frame.filter(t >= cut_s)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_broker_stopped_or_killed_mid_stream(mosquitto, tmp_path, rr_stream, how):
    url = mosquitto.url
    for u in USERS:
        publish_consent(url, u, tmp_path / "companion.sqlite", recipients=["sam"])
    sam = WorkerClient(url, "sam", lambda a: None, seen_path=tmp_path / "sam.sqlite")
    eng, th = start_engine(settings_for(url, tmp_path / "engine", resend_after_s=2.0), url)
    db = tmp_path / "engine" / "stresswatch.sqlite"
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    parts = [halves(f) for f in streams(rr_stream, start_s)]
    try:
        for first, _ in parts:
            publish_stream(url, first)
        # mid-stream: alerts are being raised and published while the broker goes away
        assert wait_for(lambda: len(raised_ids(db)) >= 3, 30)
        mosquitto.kill() if how == "kill" else mosquitto.stop()
        time.sleep(1.5)
        mosquitto.start()
        for _, second in parts:
            publish_stream(url, second)
        assert wait_for(lambda: len(raised_ids(db)) >= len(USERS) * CYCLES - len(USERS), 60), len(raised_ids(db))
        assert wait_for(lambda: {a.alert_id for a in sam.received} >= raised_ids(db), 60)
        time.sleep(1.0)
        ids = [a.alert_id for a in sam.received]
        assert len(ids) == len(set(ids)), "an alert id appeared twice in the worker's view"
        assert set(ids) == raised_ids(db)
    finally:
        eng.request_stop()
        th.join(30)
        sam.close()


def write_config(path, url, state_dir, *, client_id: str = "engine-under-test", persist_s: float | None = 0.5, chunk_users: int | None = None) -> None:
    """``persist_s``, ``chunk_users`` None: the product's default."""
    det = "\n".join(f"{k} = {v}" for k, v in FAST_DETECTOR.items())
    persist = f"persist_s = {persist_s}\n" if persist_s is not None else ""
    persist += f"state_chunk_users = {chunk_users}\n" if chunk_users is not None else ""
    path.write_text(
        f'[mqtt]\nurl = "{url}"\nclient_id = "{client_id}"\n'
        f'[store]\nstate_dir = "{state_dir}"\n'
        f"[detector]\n{det}\n"
        "[alerts]\ncooldown_s = 0\nescalate_after_s = 3600\nresend_after_s = 2.0\n"
        f"[engine]\ntick_s = 0.2\n{persist}grace_s = 0\n"
    )


def spawn_engine(config) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stresswatch.cli", "engine", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def engine_online(port) -> bool:
    body = retained(port, TOPICS.engine_status, timeout=1.0)
    return body is not None and b'"online"' in body


def test_engine_killed_mid_stream_delivers_every_raised_alert_once(mosquitto, tmp_path, rr_stream):
    url = mosquitto.url
    state = tmp_path / "engine"
    config = tmp_path / "engine.toml"
    write_config(config, url, state)
    db = state / "stresswatch.sqlite"
    for u in USERS:
        publish_consent(url, u, tmp_path / "companion.sqlite", recipients=["sam"])
    sam = WorkerClient(url, "sam", lambda a: None, seen_path=tmp_path / "sam.sqlite")
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    parts = [halves(f) for f in streams(rr_stream, start_s)]
    proc = spawn_engine(config)
    try:
        assert wait_for(lambda: engine_online(mosquitto.port), 30), proc.stderr.read1().decode() if proc.poll() is not None else ""
        feeder = threading.Thread(target=lambda: [publish_stream(url, first, chunk_s=60) for first, _ in parts])
        feeder.start()
        assert wait_for(lambda: len(raised_ids(db)) >= 3, 60)
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait(10)
        feeder.join(60)
        killed_with = raised_ids(db)
        assert wait_for(lambda: not engine_online(mosquitto.port), 15)  # its last will says offline
        for _, second in parts:  # while the engine is down: queued by the broker for its session
            publish_stream(url, second)
        proc = spawn_engine(config)
        assert wait_for(lambda: engine_online(mosquitto.port), 30)
        assert wait_for(lambda: len(raised_ids(db)) > len(killed_with), 60)
        assert wait_for(lambda: {a.alert_id for a in sam.received} >= raised_ids(db), 60)
        time.sleep(1.0)
        ids = [a.alert_id for a in sam.received]
        assert len(ids) == len(set(ids)), "an alert id appeared twice in the worker's view"
        assert set(ids) == raised_ids(db) and killed_with <= set(ids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode()
        assert not engine_online(mosquitto.port)
    finally:
        if proc.poll() is None:
            proc.kill()
        sam.close()
