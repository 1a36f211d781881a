"""The companions' path into a cluster: Mosquitto -> JetStream (``stresswatch cluster bridge``).

Companions and workers keep their MQTT 5 broker (per-user ACL, persistent sessions, message
expiry on alerts). The bridge holds a persistent session on ``{prefix}/ingest/+`` with
manual acknowledgement: each batch is decoded and checked at the wire boundary (the topic's
user must be the payload's), published into its user's partition with a message id
``user/stream_id/seq`` (JetStream drops a repeat within its duplicate window), and the
bridge's PUBACK to Mosquitto is sent only once JetStream has acknowledged it (stored on a
quorum of replicas). Until then the batch stays queued in the bridge's persistent session at
Mosquitto (which acknowledged the companion on receipt, as it does for the single engine),
and is delivered again to the next bridge if this one dies.

Consent: ``{prefix}/consent/+`` (retained: the user's every event) is checked the same way and
written to the consent bucket, then acknowledged; an empty retained message (erasure)
deletes the user's key.

Order: batches go to JetStream in the order they arrive; a publish repeated after a
JetStream failover can land after a later batch of the same user (docs/CLUSTER.md).
"""

from __future__ import annotations

import functools
import logging
import threading

import paho.mqtt.client as mqtt

from ..alerts.topics import Topics
from ..broker import private_client_id
from ..clock import utc_now
from ..config import Settings
from ..errors import ClusterError, WireError
from ..ingest import IngestBatch, IngestReceiver, Received
from ..mqtt import connect
from ..wire.consent import decode_consent
from ..wire.rejections import Rejections
from .jetstream import JetStreamIO, open_ready
from .layout import Layout
from .publish import ingest_headers

log = logging.getLogger("stresswatch.cluster.bridge")


class Bridge:
    def __init__(self, settings: Settings, *, mqtt_url: str, servers: list[str], protocol: str | None = None) -> None:
        self.settings = settings
        self.layout = Layout.of(settings.cluster)
        self.mqtt_url = mqtt_url
        self.servers = servers
        self.protocol = protocol or settings.mqtt.protocol
        self.topics = Topics(settings.mqtt.prefix)
        self.rejections = Rejections(log)
        self.forwarded = 0  # acknowledged by JetStream, then to the companion
        self.consents = 0
        self._lock = threading.Lock()
        self.jsio: JetStreamIO | None = None
        self.receiver: IngestReceiver | None = None
        self._consent_client: mqtt.Client | None = None

    def start(self) -> Bridge:
        if self.layout.user_token:
            raise ClusterError('cluster.companions = "nats-mqtt": companions publish on NATS\'s MQTT listener; no bridge runs')
        c, m = self.settings.cluster, self.settings.mqtt
        self.jsio = open_ready(self.servers, self.layout, name="stresswatch-bridge", retention_s=c.retention_days * 86_400)
        self.receiver = IngestReceiver(
            self.mqtt_url,
            self._on_batch,
            topics=self.topics,
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            client_id=private_client_id(f"{m.client_id}-bridge", m.password),
            manual_ack=True,
            on_duplicate=lambda rx: rx.ack(),  # its original is acknowledged once JetStream has it
            clock=utc_now,
            window=self.settings.engine.time_window(),
            rejections=self.rejections,
        )
        self._consent_client = connect(
            self.mqtt_url,
            private_client_id(f"{m.client_id}-bridge-consent", m.password),
            username=m.username,
            password=m.password,
            protocol=self.protocol,
            persistent_session=True,
            on_message=self._on_consent,
            on_reconnect=lambda client, _present: client.subscribe(f"{self.topics.prefix}/consent/+", qos=1),
            manual_ack=True,
        )
        self._consent_client.subscribe(f"{self.topics.prefix}/consent/+", qos=1)
        return self

    def _on_batch(self, batch: IngestBatch, rx: Received) -> None:
        """paho's thread: publish into the user's partition; PUBACK once JetStream has it."""
        assert self.jsio is not None
        subject = self.layout.ingest_subject(batch.user)
        self.jsio.publish_later(subject, rx.payload, ingest_headers(batch.user, batch.stream_id, batch.seq), then=functools.partial(self._forwarded, rx), give_up_s=None)

    def _forwarded(self, rx: Received) -> None:
        rx.ack()
        with self._lock:
            self.forwarded += 1

    def _on_consent(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        assert self.jsio is not None
        head = f"{self.topics.prefix}/consent/"
        user = msg.topic[len(head):] if msg.topic.startswith(head) else ""
        ack = functools.partial(client.ack, msg.mid, msg.qos)
        if msg.payload:
            try:
                decode_consent(msg.payload, topic_user=user, topic=msg.topic, now=utc_now(), window=self.settings.engine.time_window())
            except WireError as exc:
                self.rejections.record("consent", exc, user=user or None)
                ack()
                return
        kv = self.jsio.kv(self.layout.consent)
        coro = kv.put(user, msg.payload) if msg.payload else kv.delete(user)

        async def write_then_ack() -> None:
            await coro
            ack()
            with self._lock:
                self.consents += 1

        self.jsio.submit(write_then_ack())  # not acknowledged on failure: the broker delivers it again

    def close(self, wait_s: float = 10.0) -> None:
        """Disconnect; batches JetStream has not acknowledged within ``wait_s`` stay
        unacknowledged at the broker, which delivers them again to the next bridge."""
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self._consent_client is not None:
            self._consent_client.disconnect()
            self._consent_client.loop_stop()
            self._consent_client = None
        if self.jsio is not None:
            self.jsio.wait_published(wait_s)
            self.jsio.close()
            self.jsio = None


__all__ = ["Bridge"]
