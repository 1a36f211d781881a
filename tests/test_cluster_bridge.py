"""The bridge Mosquitto -> JetStream acknowledges a batch to Mosquitto only once JetStream has
stored it: with the NATS server down, the bridge closes with the batch unacknowledged, and
the next bridge gets it again from its persistent session and stores it.
Consent messages reach the consent bucket. Real Mosquitto, real nats-server (one node,
JetStream on disk, restarted on the same store)."""

from __future__ import annotations

import time
import uuid

import polars as pl

from stresswatch.alerts import MqttTransport, Topics
from stresswatch.cluster.bridge import Bridge
from stresswatch.cluster.layout import partition_of
from stresswatch.config import ClusterSettings, MqttSettings, Settings
from stresswatch.consent.state import Action, ConsentEvent
from stresswatch.ingest import IngestBatch
from stresswatch.wire.consent import decode_consent, encode_consent

from conftest import synthetic_rr, wait_for
from nats_cluster import start_single

TOPICS = Topics()


def test_bridge_acknowledges_a_batch_only_after_jetstream_stored_it(mosquitto, tmp_path):
    node = start_single(tmp_path / "nats")
    settings = Settings(mqtt=MqttSettings(url=mosquitto.url, client_id="bridge-test"), cluster=ClusterSettings(name="br", partitions=4, replicas=1))
    bridge = Bridge(settings, mqtt_url=mosquitto.url, servers=[node.url]).start()
    companion = MqttTransport(mosquitto.url, client_id=f"companion-{uuid.uuid4().hex[:6]}")
    try:
        user = "alice"
        frame = synthetic_rr(user, int(time.time()) // 60 * 60 - 3600, 1)
        parts = frame.with_columns((pl.col("time").dt.epoch("s") // 60).alias("m")).partition_by("m", maintain_order=True)
        batches = [IngestBatch.from_frame(p.drop("m"), user=user, stream_id="s1", seq=i, source="synthetic").encode() for i, p in enumerate(parts[:3])]
        first = companion.publish(TOPICS.ingest(user), batches[0], qos=1)
        assert wait_for(first.is_published, 10)  # Mosquitto's PUBACK to the companion (on receipt)
        assert bridge.jsio is not None
        # the bridge forwards on its own time after that: wait for the stream, not the PUBACK
        assert wait_for(lambda: bridge.jsio.partition_info(partition_of(user, 4))[0] == 1, 10)
        assert bridge.forwarded == 1

        node.kill()  # JetStream away: the bridge must not acknowledge to Mosquitto
        companion.publish(TOPICS.ingest(user), batches[1], qos=1)
        time.sleep(2)
        assert bridge.forwarded == 1
        bridge.close(wait_s=0.5)  # the bridge goes away with the batch unacknowledged
        node.start()  # the same store: the stream is back
        bridge = Bridge(settings, mqtt_url=mosquitto.url, servers=[node.url]).start()  # same session
        assert bridge.jsio is not None
        assert wait_for(lambda: bridge.forwarded == 1, 30)  # Mosquitto delivered it again
        assert bridge.jsio.partition_info(partition_of(user, 4))[0] == 2

        # a repeat of a batch (same stream id and seq) is acknowledged, not stored twice
        companion.publish(TOPICS.ingest(user), batches[1], qos=1)
        assert wait_for(lambda: bridge.receiver is not None and bridge.receiver.duplicates + bridge.forwarded >= 2, 10)
        time.sleep(0.5)
        assert bridge.jsio.partition_info(partition_of(user, 4))[0] == 2

        # consent: the user's retained message reaches the bucket every engine reads
        ev = ConsentEvent(user, Action.GRANT, _now(), "mqtt", recipients=("sam",))
        companion.publish(TOPICS.consent(user), encode_consent(user, [ev]), qos=1, retain=True)
        assert wait_for(lambda: bridge.jsio.get(bridge.layout.consent, user) is not None, 10)
        stored = bridge.jsio.get(bridge.layout.consent, user)
        assert stored is not None and stored.value is not None
        assert [e.event_id for e in decode_consent(stored.value, topic_user=user)] == [ev.event_id]
    finally:
        companion.close()
        bridge.close()
        node.stop()


def _now():  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
