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
deletes the user's key, then puts an erasure marker into the user's partition: its owner
erases the user from the detector, the outbox, the snapshot and the stream (docs/CLUSTER.md).

Workers' acks, resolves and list requests (``{prefix}/acks/+``) and users' check-ins
(``{prefix}/checkin/+``) are forwarded the same way (PUBACK after JetStream's ack) into a
partition: a check-in into its user's, an ack into the partition of the alert's user, found
in the alert index the engines write before an alert is first published. The owner applies
them in order with that partition's batches and answers on ``{prefix}/replies/{worker}``.

Order: batches go to JetStream in the order they arrive; a publish repeated after a
JetStream failover can land after a later batch of the same user (docs/CLUSTER.md).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..alerts.topics import Topics
from ..broker import private_client_id
from ..clock import utc_now
from ..config import Settings
from ..errors import ClusterError, ParseError, WireError
from ..ingest import IngestBatch, IngestReceiver, Received
from ..mqtt import connect
from ..wire.consent import decode_consent
from ..alerts.replies import REPLY_EXPIRY_S, Reply
from ..wire.acks import AckAction, AckMessage
from ..wire.ids import is_valid_id
from ..wire.rejections import Rejections
from .jetstream import JetStreamIO, open_ready
from .layout import Layout, partition_of
from .lists import merge_lists
from .publish import ingest_headers, list_request, publish_ack, publish_checkin, publish_erase

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
        self.requests = 0  # acks, list requests, check-ins, erasures forwarded
        self.list_timeout_s = 5.0  # a list waits this long for every partition's owner
        # forwards that look the alert index up run here, in order, off paho's thread
        self._requests = ThreadPoolExecutor(1, thread_name_prefix="bridge-requests")
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
            on_message=self._on_message,
            on_reconnect=lambda client, _present: client.subscribe(self._subscriptions()),
            manual_ack=True,
        )
        self._consent_client.subscribe(self._subscriptions())
        return self

    def _subscriptions(self) -> list[tuple[str, int]]:
        return [(f"{self.topics.prefix}/{kind}/+", 1) for kind in ("consent", "acks", "checkin")]

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: consent, a worker's ack or a user's check-in."""
        head, _, who = msg.topic.rpartition("/")
        kind = head.rpartition("/")[2]
        if kind == "consent":
            self._on_consent(client, userdata, msg)
        elif kind in ("acks", "checkin"):
            self._requests.submit(self._forward_request, kind, who, msg.payload, functools.partial(client.ack, msg.mid, msg.qos), msg.topic)

    def _forward_request(self, kind: str, who: str, payload: bytes, ack: functools.partial[object], topic: str) -> None:
        """Publish into the right partition (repeated until JetStream takes it), then PUBACK.
        A message that does not decode is forwarded all the same to the worker's partition:
        the owner answers it with the single engine's error reply."""
        from ..wire.checkin import decode_checkin

        assert self.jsio is not None
        if not is_valid_id(who):
            self.rejections.record(kind, "bad_id", field_name="topic")
            ack()
            return
        if kind == "acks":
            try:
                m: AckMessage | None = AckMessage.decode(payload, topic=topic)
            except ParseError:
                m = None
            if m is not None and m.action is AckAction.LIST:
                self._list(who, payload, m)
                ack()
                return
            alert_id, rid = (m.alert_id, m.request_id) if m is not None else (None, None)
            send = functools.partial(publish_ack, self.jsio, self.layout, who, payload, alert_id=alert_id, request_id=rid)
        else:
            try:
                c = decode_checkin(payload, topic_user=who, now=utc_now(), topic=topic)
            except ParseError as exc:
                self.rejections.record("checkin", exc, user=who)
                ack()
                return
            send = functools.partial(publish_checkin, self.jsio, self.layout, who, payload, checkin_id=c.checkin_id)
        self._until_stored(send)
        ack()
        with self._lock:
            self.requests += 1

    def _list(self, worker: str, payload: bytes, m: AckMessage) -> None:
        """Every partition's owner answers its part; the worker gets the merged reply (or, if a
        partition has no owner right now, a reply saying to ask again)."""
        assert self.jsio is not None and self._consent_client is not None
        try:
            answers = list_request(self.jsio, self.layout, worker, payload, request_id=m.request_id, timeout_s=self.list_timeout_s)
        except ClusterError:
            answers = []
        parts = []
        for a in answers:
            try:
                parts.append(Reply.decode(a))
            except ParseError:
                continue
        reply = merge_lists(parts, partitions=self.layout.partitions, request_id=m.request_id, limit=m.limit)
        props = None
        if self._consent_client.protocol == mqtt.MQTTv5:  # as the engine's replies: unread for an hour, of no use
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = REPLY_EXPIRY_S
        self._consent_client.publish(self.topics.replies(worker), reply.encode(), qos=1, properties=props)

    def _until_stored(self, send: functools.partial[object]) -> None:
        while self.jsio is not None:
            try:
                send()
                return
            except ClusterError:  # NATS away or electing a leader: the same message again
                time.sleep(0.5)

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
        if not msg.payload:  # erasure: consent gone at once, then the owner erases its copy
            self._requests.submit(self._erase, user, ack)
            return
        coro = self.jsio.kv(self.layout.consent).put(user, msg.payload)

        async def write_then_ack() -> None:
            await coro
            ack()
            with self._lock:
                self.consents += 1

        self.jsio.submit(write_then_ack())  # not acknowledged on failure: the broker delivers it again

    def _erase(self, user: str, ack: functools.partial[object]) -> None:
        assert self.jsio is not None
        jsio, layout = self.jsio, self.layout
        self._until_stored(functools.partial(jsio.delete, layout.consent, user))
        self._until_stored(functools.partial(publish_erase, jsio, layout, user))
        ack()
        with self._lock:
            self.consents += 1
            self.requests += 1

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
        self._requests.shutdown(wait=True, cancel_futures=True)
        if self.jsio is not None:
            self.jsio.wait_published(wait_s)
            self.jsio.close()
            self.jsio = None


__all__ = ["Bridge"]
