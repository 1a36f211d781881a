"""Nothing acknowledged is lost: the engine process killed (SIGKILL) at any point while
companions stream, with the product's default persistence interval (60 s), then restarted.
The raised alerts equal those of an uninterrupted run, and the samples store holds exactly
what was published. Real Mosquitto, the real engine process (`stresswatch engine`)."""

import signal
import threading
import time
import uuid

import polars as pl
from hypothesis import HealthCheck, given, settings, strategies as st

from stresswatch.alerts import MqttTransport
from stresswatch.engine.snapshot_files import SnapshotChunks
from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.ingest import IngestBatch
from stresswatch.store import SampleStore

from conftest import FAST_DETECTOR, synthetic_rr
from test_engine import TOPICS, publish_consent, retained, wait_for
from test_engine_recovery import engine_online, raised_ids, spawn_engine, write_config

N_USERS = 4
CYCLES = 2


def companion(url, frames, pause_s: float) -> None:
    """Publishes window-aligned batches, round by round over the users, at QoS 1; a batch is
    forgotten only once the broker acknowledged it (as the BLE companion's outbox does)."""
    t = MqttTransport(url, client_id=f"companion-{uuid.uuid4().hex[:6]}")
    stream = uuid.uuid4().hex
    minute = (pl.col("time").dt.epoch("s") // 60).alias("minute")
    parts = {u: [p.drop("minute") for p in f.with_columns(minute).partition_by("minute", maintain_order=True)] for u, f in frames.items()}
    for seq in range(max(len(p) for p in parts.values())):
        [
            t.publish(TOPICS.ingest(u), IngestBatch.from_frame(p[seq], user=u, stream_id=f"{stream}-{u}", seq=seq, source="synthetic").encode(), qos=1)
            for u, p in parts.items()
            if seq < len(p)
        ]
        t.flush(10)  # every PUBACK of the round: only then are the batches forgotten
        time.sleep(pause_s)
    t.close()


def expected_alerts(frames) -> set[str]:
    """An uninterrupted run: every sample through one detector, every window finished."""
    d = Detector(DetectorSettings(**FAST_DETECTOR))
    out = d.update(pl.concat(list(frames.values())))
    rest = d.advance(int(time.time() * 1e9), 0)
    return {a.alert_id for a in (*out.alerts, *rest.alerts)}


def run_with_kill(mosquitto, tmp_path, kill_after_s: float, *, persist_s: float | None = None, chunk_users: int | None = None) -> list[tuple[int, int]]:
    """Returns the detector chunks stored when the engine was killed: (chunk, ingest seq)."""
    url = mosquitto.url
    run = uuid.uuid4().hex[:6]  # the broker is shared by the property test's examples
    users = [f"d{run}{i}" for i in range(N_USERS)]
    state = tmp_path / "engine"
    config = tmp_path / "engine.toml"
    write_config(config, url, state, client_id=f"engine-{run}", persist_s=persist_s, chunk_users=chunk_users)  # None: the defaults (60 s)
    db = state / "stresswatch.sqlite"
    marker = f"m{run}"  # published last: once the engine has it, it has everything before it
    for u in [*users, marker]:
        publish_consent(url, u, tmp_path / "companion.sqlite", recipients=["sam"])
    start_s = int(time.time()) // 60 * 60 - 3 * 3600
    frames = {u: synthetic_rr(u, start_s, CYCLES, seed=i) for i, u in enumerate(users)}
    want = expected_alerts(frames)
    assert len(want) == N_USERS * CYCLES
    proc = spawn_engine(config)
    try:
        assert wait_for(lambda: engine_online(mosquitto.port), 30), proc.stderr.read1().decode() if proc.poll() is not None else ""
        # the engine has recorded every user's consent (their status is published): a batch
        # acknowledged before its user's consent was recorded is not covered (docs/INGEST.md)
        for u in users:
            assert wait_for(lambda u=u: retained(mosquitto.port, TOPICS.status(u), timeout=0.5) is not None, 30)
        feeder = threading.Thread(target=companion, args=(url, frames, 0.03))
        feeder.start()
        time.sleep(kill_after_s)
        proc.kill()  # SIGKILL: no shutdown code runs (by default no snapshot was taken yet: persist_s = 60)
        proc.wait(10)
        at_kill = SnapshotChunks.of_state_dir(state).positions()
        feeder.join(60)
        proc = spawn_engine(config)
        assert wait_for(lambda: engine_online(mosquitto.port), 30)
        companion(url, {marker: synthetic_rr(marker, start_s, 0).head(5)}, 0.0)
        assert wait_for(lambda: retained(mosquitto.port, TOPICS.status(marker), timeout=0.5) is not None, 60)
        assert wait_for(lambda: raised_ids(db) >= want, 60), (len(raised_ids(db)), len(want))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read().decode()[-2000:]
        assert raised_ids(db) == want
        store = SampleStore(state)
        for u, f in frames.items():
            got = store.read(u).select("time", "metric", "value").sort("time")
            assert got.equals(f.select("time", "metric", "value").sort("time")), (u, got.height, f.height)
        return at_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_kill_9_mid_stream_with_default_persistence_loses_nothing_acknowledged(mosquitto, tmp_path):
    """Hole 4 of the issue: the receiver acknowledged batches held only in memory, and the
    state was saved every 60 s; a kill lost acknowledged ingest (alerts and samples)."""
    run_with_kill(mosquitto, tmp_path, kill_after_s=1.0)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(kill_after_s=st.floats(min_value=0.0, max_value=2.0))
def test_any_kill_point_gives_the_uninterrupted_alerts_and_samples(mosquitto, tmp_path_factory, kill_after_s):
    run_with_kill(mosquitto, tmp_path_factory.mktemp("kill"), kill_after_s)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(kill_after_s=st.floats(min_value=1.0, max_value=2.5))
def test_a_kill_during_incremental_saves_gives_the_uninterrupted_alerts_and_samples(mosquitto, tmp_path_factory, kill_after_s):
    """Saves every 0.2 s, one user per chunk: a kill lands between chunks of a save, after
    some chunks were stored at later ingest positions than others; the restart replays each
    user from what their own chunk holds."""
    at_kill = run_with_kill(mosquitto, tmp_path_factory.mktemp("kill"), kill_after_s, persist_s=0.2, chunk_users=1)
    assert at_kill  # the restart restored stored chunks (and replayed each user past their own)
