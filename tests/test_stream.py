"""`stresswatch stream`: a replayed device, a real Mosquitto, the engine's IngestReceiver.

Only the radio is replaced (a recorded fixture); the broker is a real Mosquitto subprocess
that these tests stop and restart, and the buffer is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from stresswatch.ingest import IngestBatch, IngestReceiver
from stresswatch.sources import SourceRegistry, collect
from stresswatch_adapters.ble_hrs.buffer import StreamBuffer
from stresswatch_adapters.ble_hrs.stream import DurablePublisher

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ble"
pytestmark = pytest.mark.mosquitto


def expected_samples(path: Path, user: str) -> pl.DataFrame:
    src = SourceRegistry.discover().open(path, user=user)
    return asyncio.run(collect([src]))


class Engine:
    """The engine's side: an IngestReceiver collecting what it is given."""

    def __init__(self, url: str) -> None:
        self.batches: list[IngestBatch] = []
        self._lock = threading.Lock()
        self.rx = IngestReceiver(url, self._got)

    def _got(self, batch: IngestBatch) -> None:
        with self._lock:
            self.batches.append(batch)

    def samples(self) -> pl.DataFrame:
        with self._lock:
            frames = [b.to_frame() for b in self.batches]
        return pl.concat(frames) if frames else pl.DataFrame()


def run_stream(*args: str, state_dir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, STRESSWATCH_STORE__STATE_DIR=str(state_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "stresswatch.cli", "stream", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def key(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("user", "time", "metric", "value").sort("time", "metric", "value")


def test_broker_stopped_and_restarted_mid_stream_delivers_every_sample_exactly_once(mosquitto, tmp_path):
    fixture = FIXTURES / "disconnect.ble.jsonl"  # 3 min, with a device disconnect as well
    engine = Engine(mosquitto.url)
    proc = run_stream(
        "--user", "alice", "--broker", mosquitto.url, "--replay", str(fixture), "--replay-speed", "30",
        "--batch-s", "5", "--drain-timeout", "30", "--buffer", str(tmp_path / "buffer.sqlite"),
        state_dir=tmp_path / "state",
    )  # fmt: skip
    try:
        wait_until(lambda: len(engine.batches) >= 3)
        mosquitto.stop()  # the broker goes away mid-stream
        time.sleep(2.0)  # ~60 s of recorded data arrive meanwhile and must be buffered on disk
        assert proc.poll() is None
        in_buffer = StreamBuffer(tmp_path / "buffer.sqlite")
        buffered_during_outage = in_buffer.count()
        in_buffer.close()
        mosquitto.start()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        expected = expected_samples(fixture, "alice")
        wait_until(lambda: engine.samples().height >= expected.height)
        time.sleep(0.5)  # anything duplicated would arrive now
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.rx.close()
    got = engine.samples()
    assert buffered_during_outage > 0
    assert got.height == expected.height
    assert key(got).equals(key(expected))
    assert got.select("time", "metric").is_duplicated().sum() == 0
    assert StreamBuffer(tmp_path / "buffer.sqlite").count() == 0  # removed only once acknowledged
    assert "1 gap(s)" in err.decode()


def test_samples_buffered_while_the_broker_is_down_are_sent_by_a_later_run(mosquitto, tmp_path):
    fixture = FIXTURES / "session_5min.ble.jsonl"
    buffer = tmp_path / "buffer.sqlite"
    mosquitto.stop()
    first = run_stream(
        "--user", "bob", "--broker", mosquitto.url, "--replay", str(fixture), "--drain-timeout", "1",
        "--buffer", str(buffer), state_dir=tmp_path / "state",
    )  # fmt: skip
    _, err = first.communicate(timeout=60)
    assert first.returncode == 69, err.decode()
    assert "stay buffered" in err.decode()
    assert StreamBuffer(buffer).count() > 0
    mosquitto.start()
    engine = Engine(mosquitto.url)
    try:
        second = run_stream("--broker", mosquitto.url, "--drain-only", "--buffer", str(buffer), state_dir=tmp_path / "state")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 0, err.decode()
        expected = expected_samples(fixture, "bob")
        wait_until(lambda: engine.samples().height >= expected.height)
    finally:
        engine.rx.close()
    assert key(engine.samples()).equals(key(expected))
    assert StreamBuffer(buffer).count() == 0


def test_rows_leave_the_buffer_only_after_puback(mosquitto, tmp_path):
    box = StreamBuffer(tmp_path / "b.sqlite")
    for seq in range(5):
        box.add("s", seq, "stresswatch/v1/ingest/carol", b"{}", 1)
    mosquitto.stop()
    pub = DurablePublisher(mosquitto.url, box, reconnect_max_s=1)
    try:
        assert pub.drain(1.0) is False  # no broker: nothing acknowledged, nothing removed
        assert box.count() == 5
        mosquitto.start()
        assert pub.drain(20.0) is True
        assert pub.acked == 5 and box.count() == 0
    finally:
        pub.close()
        box.close()
