"""The bulk ingest reader (`stresswatch.mqtt_bulk.BulkSubscriber`) against real brokers: the
generated Mosquitto with passwords and TLS, MQTT 5 and 3.1.1, the embedded amqtt broker
(3.1.1 only), and a broker restart with messages received but not yet acknowledged."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from stresswatch.alerts.transport import MqttTransport
from stresswatch.broker import EmbeddedBroker
from stresswatch.mqtt import NotAuthorised
from stresswatch.mqtt_bulk import BulkSubscriber
from stresswatch.mqtt_packets import Publish

from conftest import wait_for
from test_broker_security import ENGINE, P, throwaway_pki, tls_broker  # noqa: F401 - fixtures

pytestmark = pytest.mark.mosquitto


class Collector:
    """Keeps what arrives; acknowledges it at once unless ``hold``."""

    def __init__(self, hold: bool = False) -> None:
        self.got: list[tuple[Publish, int]] = []
        self.hold = hold
        self.sub: BulkSubscriber | None = None
        self._lock = threading.Lock()

    def __call__(self, publishes: list[Publish], generation: int) -> None:
        with self._lock:
            self.got += [(p, generation) for p in publishes]
        if not self.hold and self.sub is not None:
            for p in publishes:
                self.sub.ack(p.packet_id, generation)
            self.sub.flush_acks()

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p.payload for p, _ in self.got]


def publish_all(url: str, topic: str, payloads: list[bytes], **account) -> None:
    t = MqttTransport(url, client_id=f"pub-{uuid.uuid4().hex[:6]}", **account)
    for p in payloads:
        t.publish(topic, p, qos=1)
    t.flush(10)
    t.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_over_tls_with_a_password_every_message_arrives_once(tls_broker, throwaway_pki, protocol):
    b = tls_broker
    url = b.tls_url(throwaway_pki["ca"])
    c = Collector()
    c.sub = BulkSubscriber(url, f"engine-{protocol}", f"{P}/ingest/+", c, username=ENGINE, password=b.passwords[ENGINE], protocol=protocol).start()
    try:
        assert c.sub.version == (5 if protocol == "5" else 4)
        sent = [f"batch-{i}".encode() * 20 for i in range(300)]
        publish_all(url, f"{P}/ingest/alice", sent, username="alice", password=b.passwords["alice"])
        assert wait_for(lambda: len(c.payloads()) >= len(sent), 20)
        time.sleep(0.3)
        assert c.payloads() == sent  # in order, none twice
        assert all(p.topic == f"{P}/ingest/alice" and p.qos == 1 for p, _ in c.got)
    finally:
        c.sub.close()
    with pytest.raises(NotAuthorised, match="not authorised"):
        BulkSubscriber(url, "engine-wrong", f"{P}/ingest/+", Collector(), username=ENGINE, password="wrong").start()


def test_auto_falls_back_to_mqtt_311_on_the_embedded_broker():
    with EmbeddedBroker() as broker:
        c = Collector()
        c.sub = BulkSubscriber(broker.url, "engine", "sw/ingest/+", c).start()
        try:
            assert c.sub.version == 4
            publish_all(broker.url, "sw/ingest/alice", [b"a", b"b", b"c"])
            assert wait_for(lambda: c.payloads() == [b"a", b"b", b"c"], 10), c.payloads()
        finally:
            c.sub.close()


def test_unacknowledged_messages_come_again_after_a_broker_restart_and_old_acks_are_dropped(mosquitto):
    c = Collector(hold=True)
    c.sub = BulkSubscriber(mosquitto.url, "engine-held", "sw/ingest/+", c, reconnect_max_s=1).start()
    try:
        publish_all(mosquitto.url, "sw/ingest/alice", [f"m{i}".encode() for i in range(10)])
        assert wait_for(lambda: len(c.payloads()) == 10, 10)
        first = list(c.got)
        mosquitto.stop()  # SIGTERM: the broker saves the session with its 10 unacknowledged messages
        mosquitto.start()
        assert wait_for(lambda: len(c.payloads()) == 20, 20), c.payloads()
        again = c.got[10:]
        assert [p.payload for p, _ in again] == [p.payload for p, _ in first]
        assert all(p.dup for p, _ in again) and {g for _, g in again} != {g for _, g in first}
        for p, g in first:  # acks meant for the first connection: dropped, not sent on the second
            c.sub.ack(p.packet_id, g)
        c.sub.flush_acks()
        time.sleep(0.3)
        for p, g in again:
            c.sub.ack(p.packet_id, g)
        c.sub.flush_acks()
        time.sleep(0.5)
        mosquitto.stop()
        mosquitto.start()
        time.sleep(2.0)
        assert len(c.payloads()) == 20  # everything acknowledged: nothing comes a third time
    finally:
        c.sub.close()
