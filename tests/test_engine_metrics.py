"""The engine's operator endpoint: /metrics reports the ingest and alerts that happened, and
/healthz turns unhealthy when the engine thread stalls or the broker goes away. A real
engine, the generated broker with real accounts, a real worker client."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stresswatch.alerts.worker import WorkerClient
from stresswatch.broker import free_port, private_client_id
from stresswatch.config import MetricsSettings
from stresswatch.engine.metrics import EngineMetrics, assess_health

from conftest import wait_for
from engine_harness import engine_settings, publish_consent, running_engine, stream_as


def scrape(url: str) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, text


def health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def m(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


@pytest.mark.mosquitto
def test_metrics_count_what_happened_and_health_follows_the_engine(secure_broker, tmp_path, rr_stream):
    b = secure_broker
    port = free_port()
    settings = engine_settings(b, tmp_path / "engine").model_copy(update={"metrics": MetricsSettings(port=port, stall_s=1.0)})
    url = f"http://127.0.0.1:{port}"
    got: list = []
    pw = b.passwords["sam"]
    sam = WorkerClient(b.url, "sam", got.append, username="sam", password=pw, client_id=private_client_id("stresswatch-worker-sam", pw))
    try:
        with running_engine(settings) as eng:
            status, body = health(url)
            assert status == 200 and body["status"] == "ok", body
            publish_consent(b, "alice", ["sam"], tmp_path)
            start_s = int(time.time()) // 60 * 60 - 3 * 3600
            frame = rr_stream("alice", start_s, 2, seed=1)  # two stressed episodes: two alerts
            batches = frame.select((pl.col("time").dt.epoch("s") // 240).n_unique()).item()
            stream_as(b, "alice", frame)
            assert wait_for(lambda: len(got) == 2, 30), got
            for alert in got:
                sam.ack(alert.alert_id)

            def counted() -> bool:
                s, _ = scrape(url)
                return m(s, "stresswatch_alerts_acknowledged_total") == 2 and m(s, "stresswatch_ingest_samples_total") == frame.height

            assert wait_for(counted, 20)
            s, _ = scrape(url)
            assert m(s, "stresswatch_ingest_messages_total", result="accepted") == batches
            assert m(s, "stresswatch_ingest_batches_total") == batches
            assert m(s, "stresswatch_ingest_samples_total") == frame.height
            assert m(s, "stresswatch_alerts_raised_total") == 2
            assert m(s, "stresswatch_alerts_delivered_total") == 2
            assert m(s, "stresswatch_alerts_withheld_total") == 0 and m(s, "stresswatch_alerts_undeliverable_total") == 0
            assert m(s, "stresswatch_alert_delivery_seconds_count") == 2
            assert 0 < m(s, "stresswatch_alert_delivery_seconds_sum") < 10
            assert m(s, "stresswatch_detector_users") == 1
            assert m(s, "stresswatch_broker_connected", link="alerts") == 1 and m(s, "stresswatch_broker_connected", link="ingest") == 1
            assert m(s, "stresswatch_ingest_wait_seconds_count") >= 1
            assert wait_for(lambda: m(scrape(url)[0], "stresswatch_state_save_seconds_count") >= 1, 10)  # persist_s 0.5
            # nobody's id in the metrics: no per-user or per-worker label
            label_values = {v for (_, labels) in s for _, v in labels}
            assert not label_values & {"alice", "bob", "sam", "kim"}, label_values
            assert {k for (_, labels) in s for k, _ in labels} <= {"result", "reason", "kind", "link", "le"}

            # the engine thread stuck in one job: unhealthy while it lasts, healthy after
            eng.call_soon(lambda: time.sleep(3.0))
            assert wait_for(lambda: health(url)[0] == 503, 5)
            status, body = health(url)
            assert body["checks"]["loop"] is False and body["checks"]["broker"] is True
            assert wait_for(lambda: health(url)[0] == 200, 10)

            # the broker goes away: unhealthy, and the link gauges say which
            b.process.kill()
            assert wait_for(lambda: health(url)[0] == 503, 10)
            status, body = health(url)
            assert body["checks"]["broker"] is False
            s, _ = scrape(url)
            assert m(s, "stresswatch_broker_connected", link="ingest") == 0
            assert m(s, "stresswatch_engine_healthy") == 0
        with pytest.raises(urllib.error.URLError):  # stopped with the engine
            urllib.request.urlopen(f"{url}/healthz", timeout=2)
    finally:
        sam.close()


def test_each_engine_has_its_own_registry():
    """Two engines in one process (or a test beside a service) never share or clash on counts."""
    a, b = EngineMetrics(), EngineMetrics()
    a.alert_delivery.observe(0.2)
    assert a.registry.get_sample_value("stresswatch_alert_delivery_seconds_count") == 1
    assert b.registry.get_sample_value("stresswatch_alert_delivery_seconds_count") == 0


def test_health_needs_every_check():
    links = {"alerts": True, "ingest": True}
    assert assess_health(running=True, broker_links=links, loop_age_s=0.1, stall_s=30).ok
    assert not assess_health(running=False, broker_links=links, loop_age_s=0.1, stall_s=30).ok
    assert not assess_health(running=True, broker_links={**links, "ingest": False}, loop_age_s=0.1, stall_s=30).ok
    assert not assess_health(running=True, broker_links={**links, "ingest": None}, loop_age_s=0.1, stall_s=30).ok  # unknown is not up
    assert not assess_health(running=True, broker_links=links, loop_age_s=31, stall_s=30).ok
