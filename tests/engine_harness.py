"""A real engine on its own thread against a test's broker, with the accounts of
`stresswatch broker config` (shared by the worker-reply, check-in and worker-app tests)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from stresswatch.alerts import Topics
from stresswatch.alerts.transport import MqttTransport
from stresswatch.broker import private_client_id
from stresswatch.config import AlertSettings, DetectorSettings, EngineSettings, MqttSettings, Settings, StoreSettings
from stresswatch.consent import ConsentLedger
from stresswatch.consent.state import Visibility
from stresswatch.wire.consent import encode_consent
from stresswatch.engine import Engine

from conftest import FAST_DETECTOR

ENGINE = "stresswatch-engine"


def engine_settings(b, state: Path, groups: dict[str, list[str]] | None = None) -> Settings:
    pw = b.passwords[ENGINE]
    return Settings(
        mqtt=MqttSettings(url=b.url, username=ENGINE, password=pw, client_id=private_client_id(ENGINE, pw)),
        detector=DetectorSettings(**FAST_DETECTOR),
        store=StoreSettings(state_dir=state),
        alerts=AlertSettings(cooldown_s=0, checkin_cooldown_s=0, escalate_after_s=3600),
        engine=EngineSettings(tick_s=0.2, persist_s=0.5, grace_s=0),
        groups=groups or {},
    )


@contextmanager
def running_engine(settings: Settings) -> Iterator[Engine]:
    eng = Engine(settings, url=settings.mqtt.url)
    th = threading.Thread(target=eng.run, daemon=True)
    th.start()
    try:
        assert eng.ready.wait(20)
        yield eng
    finally:
        eng.request_stop()
        th.join(20)
    assert not th.is_alive()


def publish_consent(b, user: str, recipients: list[str], tmp: Path, *, name: str | None = None) -> None:
    """The companion grants, with the user's own account (retained on the consent topic)."""
    with ConsentLedger(tmp / f"companion-{user}.sqlite") as companion:
        companion.grant(user, recipients, now=datetime.now(timezone.utc), visibility=Visibility.LEVEL_AND_REASONS, display_name=name)
        t = MqttTransport(b.url, client_id=f"companion-{user}", username=user, password=b.passwords[user])
        t.publish(Topics().consent(user), encode_consent(user, companion.events(user)), qos=1, retain=True)
        t.close()


def stream_as(b, user: str, frame) -> None:  # type: ignore[no-untyped-def]
    """The companion streams ``frame`` (samples) as ingest batches, with the user's own account."""
    import uuid

    import polars as pl

    from stresswatch.ingest import IngestBatch

    t = MqttTransport(b.url, client_id=f"companion-{user}-{uuid.uuid4().hex[:6]}", username=user, password=b.passwords[user])
    stream_id = uuid.uuid4().hex
    for seq, (_, part) in enumerate(frame.group_by(pl.col("time").dt.epoch("s") // 240, maintain_order=True)):
        t.publish(Topics().ingest(user), IngestBatch.from_frame(part, user=user, stream_id=stream_id, seq=seq, source="synthetic").encode(), qos=1)
    t.close()
