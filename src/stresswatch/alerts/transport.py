"""Alert transport: a one-method seam (``publish``) with a paho-mqtt implementation and an
in-memory one for replays and tests of pure logic.

The MQTT client comes from :func:`stresswatch.mqtt.connect` (protocol, TLS, credentials,
reconnect: one meaning everywhere).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..errors import TransportError
from ..mqtt import BrokerAddress, connect

__all__ = ["ACKED", "BrokerAddress", "MemoryTransport", "Message", "MqttTransport", "Receipt", "Transport", "connect"]


class Receipt(Protocol):
    """What publish returns: whether the broker has acknowledged the message (PUBACK)."""

    def is_published(self) -> bool: ...


class _Acked:
    def is_published(self) -> bool:
        return True


ACKED: Receipt = _Acked()


class Transport(Protocol):
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> Receipt: ...

    def flush(self, timeout_s: float = 10.0) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    expiry_s: int | None


@dataclass
class MemoryTransport:
    """Keeps what was published, in order. For replays without a broker and pure tests."""

    messages: list[Message] = field(default_factory=list)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> Receipt:
        self.messages.append(Message(topic, payload, qos, retain, expiry_s))
        return ACKED

    def flush(self, timeout_s: float = 10.0) -> None:
        return None

    def close(self) -> None:
        return None


_COMPACT_PENDING = 10_000


class _PahoReceipt:
    """paho's MQTTMessageInfo raises from ``is_published`` for a message published while
    disconnected; here that is simply "not acknowledged (yet)": the outbox publishes it again."""

    __slots__ = ("info",)

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self.info = info

    def is_published(self) -> bool:
        try:
            return self.info.is_published()
        except (RuntimeError, ValueError):
            return False


class MqttTransport:
    """Publishes through a real broker; :meth:`flush` waits until the broker acknowledged."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "stresswatch-engine",
        username: str | None = None,
        password: str | None = None,
        protocol: str = "auto",
        will: tuple[str, bytes] | None = None,
        persistent_session: bool = False,
        on_message: Callable[[str, bytes], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        on_connection_lost: Callable[[], None] | None = None,
    ) -> None:
        """``on_message(topic, payload)`` runs on paho's network thread for subscribed topics;
        :meth:`subscribe` subscriptions are renewed after a reconnect, then ``on_reconnect()``."""
        self.url = url
        self._subscriptions: list[str] = []
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._client = connect(
            url,
            client_id,
            username=username,
            password=password,
            protocol=protocol,
            will=will,
            persistent_session=persistent_session,
            on_message=(lambda c, u, m: on_message(m.topic, m.payload)) if on_message else None,
            on_reconnect=self._reconnected,
        )
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._compact_at = _COMPACT_PENDING
        self._topics: dict[int, str] = {}  # mid -> topic of pending publishes, to name a refusal
        self._refused: dict[int, str] = {}  # mid -> the broker's reason (MQTT 5 PUBACK reason code)
        self._v5 = self._client.protocol == mqtt.MQTTv5
        self._client.on_publish = self._acknowledged
        if on_connection_lost is not None:

            def lost(c: mqtt.Client, userdata: object, flags: object, rc: object = None, props: object = None) -> None:
                if getattr(rc, "is_failure", bool(rc)):  # not our own disconnect()
                    on_connection_lost()

            self._client.on_disconnect = lost

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def _acknowledged(self, client: mqtt.Client, userdata: object, mid: int, reason: object = None, props: object = None) -> None:
        # An MQTT 5 broker acknowledges a publish its ACL refused with a failure reason code
        # (0x87 not authorized); paho still counts it as published, so keep the reason.
        if getattr(reason, "is_failure", False):
            self._refused[mid] = str(reason)

    def _reconnected(self, client: mqtt.Client, session_present: bool) -> None:
        if self._subscriptions and not session_present:
            client.subscribe([(t, 1) for t in self._subscriptions])
        if self._on_reconnect:
            self._on_reconnect()

    def subscribe(self, topics: list[str], timeout_s: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        done = threading.Event()
        self._client.on_subscribe = lambda *a: done.set()
        result, _ = self._client.subscribe([(t, 1) for t in topics])
        if result != mqtt.MQTT_ERR_SUCCESS or not done.wait(timeout_s):
            raise TransportError(f"no SUBACK for {topics}", url=self.url)
        self._subscriptions.extend(topics)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> Receipt:
        props = None
        if self._v5 and expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise TransportError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}", url=self.url)
        if len(self._pending) >= self._compact_at:  # a long-running engine: forget what was acknowledged
            self._pending = [i for i in self._pending if not i.is_published()]
            self._topics = {i.mid: self._topics.get(i.mid, "") for i in self._pending}
            # Next time at twice what is still unacknowledged: compacting at every publish once
            # 10,000 were unacknowledged (100,000 statuses at engine start) was quadratic.
            self._compact_at = max(_COMPACT_PENDING, 2 * len(self._pending))
        self._pending.append(info)
        self._topics[info.mid] = topic
        return _PahoReceipt(info)

    def flush(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for info in self._pending:
            remaining = deadline - time.monotonic()
            try:
                info.wait_for_publish(max(remaining, 0.0))
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish not acknowledged: {exc}", url=self.url) from None
            if not info.is_published():
                raise TransportError(f"broker did not acknowledge within {timeout_s:g} s", url=self.url)
        refused = [(self._topics.get(i.mid, "?"), self._refused.pop(i.mid)) for i in self._pending if i.mid in self._refused]
        self._pending.clear()
        self._topics.clear()
        self._compact_at = _COMPACT_PENDING
        if refused:
            topic, why = refused[0]
            raise TransportError(f"broker refused {len(refused)} publish(es), first to {topic!r}: {why}", url=self.url)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._client.disconnect()
            self._client.loop_stop()
