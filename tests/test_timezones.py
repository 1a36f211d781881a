"""Time-of-day baselines in the person's own time zone: named in their consent (wire field,
ledger, `consent grant --tz`) or in configuration (`[detector] timezone`, `user_timezones`),
and fed to the detector by the engine (real Mosquitto) and by replay."""

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings, strategies as st

from stresswatch.alerts import Topics
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MqttTransport
from stresswatch.clock import is_zone
from stresswatch.config import DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings, load_settings
from stresswatch.consent import ConsentLedger
from stresswatch.engine.persist import stored_detector
from stresswatch.engine import Engine
from stresswatch.errors import ConfigError, ConsentError, ParseError, WireError
from stresswatch.ingest import IngestBatch
from stresswatch.model import SAMPLES_SCHEMA
from stresswatch.replay import replay
from stresswatch.wire.consent import decode_consent, encode_consent

from conftest import FAST_DETECTOR, wait_for

T = datetime(2026, 11, 25, 9, tzinfo=timezone.utc)
TOPICS = Topics()
GRANT = {"event_id": "e1", "action": "grant", "at": "2026-11-25T10:00:00+00:00", "via": "cli", "text_version": "2026-11-2", "recipients": ["sam"]}


def consent_payload(**event) -> bytes:
    return json.dumps({"schema_version": 1, "user": "alice", "events": [{**GRANT, **event}]}).encode()


# -- the wire and the ledger ---------------------------------------------------------------------
def test_a_grant_names_the_persons_zone_and_it_survives_wire_and_ledger(tmp_path):
    with ConsentLedger(tmp_path / "companion.sqlite") as c:
        c.grant("alice", ["sam"], now=T, timezone="Asia/Tokyo")
        c.pause("alice", now=T + timedelta(hours=1))  # a pause keeps the choices, the zone too
        payload = encode_consent("alice", c.events("alice"))
    with ConsentLedger(tmp_path / "engine.sqlite") as e:
        e.extend(decode_consent(payload, topic_user="alice"))
        assert e.state("alice").timezone == "Asia/Tokyo"
    with ConsentLedger(tmp_path / "engine.sqlite") as e:  # read back from the file
        assert e.state("alice").timezone == "Asia/Tokyo"


def test_a_grant_without_a_zone_names_none_and_a_later_grant_moves_it(tmp_path):
    with ConsentLedger(tmp_path / "l.sqlite") as c:
        assert c.grant("alice", ["sam"], now=T).timezone is None
        assert c.grant("alice", ["sam"], now=T + timedelta(days=1), timezone="America/New_York").timezone == "America/New_York"
        with pytest.raises(ConsentError, match="time zone"):
            c.grant("alice", ["sam"], now=T + timedelta(days=2), timezone="Mars/Olympus_Mons")
        assert c.state("alice").timezone == "America/New_York"  # nothing recorded by the refusal


@pytest.mark.parametrize("bad", ["Mars/Olympus_Mons", "America", "../../etc/passwd", "", "Asia/Tokyo\x00", "x" * 60])
def test_a_bad_zone_on_the_wire_is_one_refusal_naming_the_field(bad):
    with pytest.raises(WireError) as err:
        decode_consent(consent_payload(timezone=bad), topic_user="alice")
    assert err.value.field == "events.0.timezone"
    assert err.value.reason in ("malformed", "too_large")


def test_a_zone_database_folder_in_quiet_hours_is_refused_not_an_os_error():
    # ZoneInfo("America") raises IsADirectoryError, which escaped the decoder before
    with pytest.raises(WireError) as err:
        decode_consent(consent_payload(quiet_hours="22:00-07:00@America"), topic_user="alice")
    assert err.value.field == "events.0.quiet_hours"


@settings(max_examples=200)
@given(st.text(max_size=40))
def test_any_zone_text_is_accepted_only_if_it_is_a_zone(text):
    try:
        events = decode_consent(consent_payload(timezone=text), topic_user="alice")
    except ParseError:
        return
    assert is_zone(events[0].timezone)


# -- configuration -------------------------------------------------------------------------------
def test_configured_zones_are_checked_when_the_settings_load(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[detector]\ntimezone = "Europe/Berlin"\nuser_timezones = { bob = "Asia/Tokyo" }\n')
    s = load_settings(good, env={})
    assert (s.detector.timezone, s.detector.user_timezones) == ("Europe/Berlin", {"bob": "Asia/Tokyo"})
    bad = tmp_path / "bad.toml"
    bad.write_text('[detector]\nuser_timezones = { bob = "Asia/Tokio" }\n')
    with pytest.raises(ConfigError, match=r"detector\.user_timezones.*bob.*Asia/Tokio"):
        load_settings(bad, env={})


# -- replay ---------------------------------------------------------------------------------------
def rr_samples(user: str, start: datetime, minutes: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rr = 900 + rng.normal(0, 40, int(minutes * 60 / 0.9))
    t = int(start.timestamp() * 1e9) + np.cumsum(rr * 1e6).astype(np.int64)
    return pl.DataFrame(
        {"user": user, "time": pl.Series(t).cast(pl.Datetime("ns", "UTC")), "metric": "rr_ms", "value": rr, "source": "test"},
        schema=SAMPLES_SCHEMA,
    )


def slots(result, user: str) -> set[int]:
    return set(result.windows.filter(pl.col("user") == user).get_column("baseline_slot").to_list())


def test_replay_scores_each_person_in_the_zone_their_consent_or_the_configuration_names(tmp_path):
    """00:00-02:00 UTC is 09:00-11:00 in Tokyo: the morning slot (06-12), not the night one."""
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    samples = pl.concat([rr_samples(u, day, 120, i) for i, u in enumerate(("tokyo", "berlin", "utc"))])
    db = tmp_path / "consent.sqlite"
    with ConsentLedger(db) as ledger:
        ledger.grant("tokyo", ["sam"], now=day - timedelta(days=1), timezone="Asia/Tokyo")
        ledger.grant("berlin", ["sam"], now=day - timedelta(days=1))  # no zone in the consent
    base = Settings(store=StoreSettings(state_dir=tmp_path))
    cfg = base.model_copy(update={"detector": DetectorSettings(user_timezones={"berlin": "Europe/Berlin", "tokyo": "Europe/Berlin"})})
    result = replay(samples, settings=cfg, consent_db=db)
    assert slots(result, "tokyo") == {1}  # the consent's zone comes before the configuration's
    assert slots(result, "berlin") == {0}  # 01:00-03:00 in Berlin: the night slot
    assert slots(result, "utc") == {0}
    everyone = base.model_copy(update={"detector": DetectorSettings(timezone="Asia/Tokyo")})
    assert slots(replay(samples, settings=everyone), "utc") == {1}
    assert slots(replay(samples, settings=base), "tokyo") == {0}  # no consent given to this replay: UTC


def cli(*args: str, home) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    env = {**os.environ, "STRESSWATCH_STORE__STATE_DIR": str(home)}
    return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_commands_take_a_zone_and_refuse_a_bad_one_in_one_line(tmp_path):
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    path = tmp_path / "s.parquet"
    rr_samples("p1", day, 60).write_parquet(path)
    home = tmp_path / "home"
    run = cli("replay", str(path), "--out", str(tmp_path / "o"), "--set", "detector.timezone=Asia/Tokyo", home=home)
    assert run.returncode == 0, run.stderr
    assert set(pl.read_parquet(tmp_path / "o" / "windows.parquet").get_column("baseline_slot").to_list()) == {1}
    bad = cli("replay", str(path), "--out", str(tmp_path / "b"), "--set", "detector.timezone=Asia/Tokio", home=home)
    assert bad.returncode != 0 and "detector.timezone" in bad.stderr and "Asia/Tokio" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "windows.parquet").exists()
    granted = cli("consent", "grant", "--user", "kenji", "--to", "sam", "--tz", "Asia/Tokyo", "--yes", home=home)
    assert granted.returncode == 0, granted.stderr
    assert "your time zone Asia/Tokyo" in cli("consent", "show", "--user", "kenji", home=home).stdout
    refused = cli("consent", "grant", "--user", "kenji", "--to", "sam", "--tz", "Asia/Tokio", "--yes", home=home)
    assert refused.returncode != 0 and "Asia/Tokio" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "Asia/Tokyo" in cli("consent", "show", "--user", "kenji", home=home).stdout  # nothing recorded


# -- the engine, through a real Mosquitto ---------------------------------------------------------
def publish(url: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    t = MqttTransport(url, client_id=f"companion-{uuid.uuid4().hex[:6]}")
    t.publish(topic, payload, qos=1, retain=retain)
    t.close()


def stored_zone(state, user: str) -> str | None:  # noqa: ANN001
    with ConsentLedger(state / "stresswatch.sqlite") as ledger:  # the engine's file, read from this thread
        return ledger.state(user).timezone


def test_engine_scores_a_person_in_their_consents_zone_and_refuses_a_bad_zone(mosquitto, tmp_path):
    url = mosquitto.url
    state = tmp_path / "state"
    detector = DetectorSettings(**{**FAST_DETECTOR, "baseline_slots": 4})
    s = Settings(
        mqtt=MqttSettings(url=url),
        detector=detector,
        store=StoreSettings(state_dir=state),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
    )
    now = datetime.now(timezone.utc)
    with ConsentLedger(tmp_path / "companion.sqlite") as c:
        c.grant("kenji", ["sam"], now=now, timezone="Asia/Tokyo")
        publish(url, TOPICS.consent("kenji"), encode_consent("kenji", c.events("kenji")), retain=True)
    publish(url, TOPICS.consent("mallory"), consent_payload(timezone="Mars/Olympus_Mons").replace(b'"alice"', b'"mallory"'), retain=True)
    eng = Engine(s, url=url)
    th = threading.Thread(target=eng.run, daemon=True)
    th.start()
    try:
        assert eng.ready.wait(20)
        assert wait_for(lambda: stored_zone(state, "kenji") == "Asia/Tokyo", 10)
        assert wait_for(lambda: eng.rejections.counts().get(("consent", "malformed")) == 1, 10)
        # beats up to a few minutes ahead of now (inside the clock-skew window): the last
        # minute stays open in the detector, and is saved with the state at shutdown
        frame = rr_samples("kenji", now - timedelta(minutes=4), 8)
        t = MqttTransport(url, client_id="companion-kenji")
        for seq, (_, part) in enumerate(frame.group_by(pl.col("time").dt.epoch("s") // 120, maintain_order=True)):
            t.publish(TOPICS.ingest("kenji"), IngestBatch.from_frame(part, user="kenji", stream_id="s1", seq=seq, source="test").encode(), qos=1)
        t.close()
        assert wait_for(lambda: eng.stats().samples_processed == frame.height, 20)
        assert eng.pipeline.zones == {"kenji": "Asia/Tokyo"}
    finally:
        eng.request_stop()
        th.join(20)
    assert not th.is_alive()
    with ConsentLedger(state / "stresswatch.sqlite") as ledger:
        assert ledger.events("mallory") == []  # the refused message stored nothing
    with Outbox(state / "stresswatch.sqlite") as outbox:
        saved = stored_detector(outbox, detector)
    open_window = saved.flush().windows.filter(pl.col("user") == "kenji")
    assert open_window.height == 1
    start = open_window.item(0, "window_start")
    tokyo, utc = start.astimezone(ZoneInfo("Asia/Tokyo")).hour // 6, start.hour // 6
    assert tokyo != utc  # nine hours apart: never the same 6-hour slot
    assert open_window.item(0, "baseline_slot") == tokyo
