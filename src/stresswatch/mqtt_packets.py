"""MQTT packets as the engine's bulk ingest reader needs them (pure: bytes in, values out).

:func:`split_packets` walks a receive buffer and returns every *complete* packet in it, with
the number of bytes consumed; an incomplete packet at the end stays for the next read, so
splitting a stream at any byte boundary gives the same packets as reading it whole. PUBLISH
packets are decoded (:class:`Publish`), other packets from the broker are returned as
:class:`Packet` (type, flags, body) for the caller to read with :func:`read_connack` or
:func:`read_suback`. Malformed bytes raise :class:`stresswatch.errors.PacketError` and nothing
else. The encoders write the few packets a subscriber sends (CONNECT, SUBSCRIBE, PUBACK,
PINGREQ, DISCONNECT).

Both MQTT 3.1.1 (protocol level 4) and MQTT 5 (level 5) are read: version 5 adds a property
block to PUBLISH, CONNACK and SUBACK, which is skipped (the subscriber announces no topic
alias maximum, so the broker sends every PUBLISH with its topic name).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import PacketError

MQTT_311 = 4
MQTT_5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
# What a broker may send to a client (a CONNECT, SUBSCRIBE, ... from the broker is malformed).
_FROM_BROKER = frozenset({CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP, DISCONNECT, AUTH})
MAX_REMAINING_LENGTH = 268_435_455  # the largest a 4-byte remaining length can say

_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Publish:
    """A PUBLISH from the broker. ``packet_id`` is 0 for QoS 0."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool = False
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Packet:
    """Any other packet from the broker: its type, the fixed header's flags and its body."""

    kind: int
    flags: int
    body: bytes


def _varint(data: bytes | bytearray | memoryview, at: int, end: int) -> tuple[int, int] | None:
    """(value, next offset) of a variable byte integer at ``at``, None if ``end`` comes first."""
    value = 0
    shift = 0
    for i in range(4):
        if at + i >= end:
            return None
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise PacketError("variable byte integer longer than 4 bytes", position=at, field="remaining length")


def split_packets(
    data: bytes | bytearray | memoryview, version: int = MQTT_311, *, max_packet_bytes: int = MAX_REMAINING_LENGTH + 5
) -> tuple[list[Publish | Packet], int]:
    """Every complete packet in ``data`` and how many bytes they take.

    A packet larger than ``max_packet_bytes`` raises :class:`PacketError` as soon as its
    header says so (before its bytes arrive), as does anything that is not a packet a broker
    may send a subscriber of protocol ``version``.
    """
    out: list[Publish | Packet] = []
    end = len(data)
    at = 0
    while at < end:
        head = _varint(data, at + 1, end)
        if head is None:
            break
        length, body_at = head
        if body_at - at + length > max_packet_bytes:
            raise PacketError(f"packet of {body_at - at + length} bytes exceeds {max_packet_bytes}", position=at)
        if body_at + length > end:
            break
        first = data[at]
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            out.append(_publish(bytes(data[body_at : body_at + length]), flags, version, at))
        elif kind in _FROM_BROKER:
            out.append(Packet(kind, flags, bytes(data[body_at : body_at + length])))
        else:
            raise PacketError(f"packet type {kind} is not sent by a broker", position=at, field="packet type")
        at = body_at + length
    return out, at


def _publish(body: bytes, flags: int, version: int, where: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise PacketError("PUBLISH with QoS 3", position=where, field="qos")
    if len(body) < 2:
        raise PacketError("PUBLISH without a topic", position=where, field="topic")
    (tlen,) = _U16.unpack_from(body, 0)
    at = 2 + tlen
    if tlen == 0 or at > len(body):
        raise PacketError("PUBLISH topic length outside the packet", position=where, field="topic")
    try:
        topic = body[2:at].decode("utf-8")
    except UnicodeDecodeError:
        raise PacketError("PUBLISH topic is not UTF-8", position=where, field="topic") from None
    pid = 0
    if qos:
        if at + 2 > len(body):
            raise PacketError("PUBLISH without its packet id", position=where, field="packet id")
        (pid,) = _U16.unpack_from(body, at)
        if pid == 0:
            raise PacketError("PUBLISH with packet id 0", position=where, field="packet id")
        at += 2
    if version >= MQTT_5:
        props = _varint(body, at, len(body))
        if props is None or props[1] + props[0] > len(body):
            raise PacketError("PUBLISH properties outside the packet", position=where, field="properties")
        at = props[1] + props[0]
    return Publish(topic, body[at:], qos, pid, bool(flags & 0x08), bool(flags & 0x01))


def read_connack(packet: Packet) -> tuple[bool, int]:
    """(session present, reason code); 0 is success in both versions."""
    if packet.kind != CONNACK or len(packet.body) < 2:
        raise PacketError("expected a CONNACK", field="packet type")
    return bool(packet.body[0] & 0x01), packet.body[1]


def read_suback(packet: Packet, version: int = MQTT_311) -> tuple[int, bytes]:
    """(packet id, the granted QoS or reason code of each topic filter)."""
    if packet.kind != SUBACK or len(packet.body) < 3:
        raise PacketError("expected a SUBACK", field="packet type")
    (pid,) = _U16.unpack_from(packet.body, 0)
    at = 2
    if version >= MQTT_5:
        props = _varint(packet.body, at, len(packet.body))
        if props is None or props[1] + props[0] > len(packet.body):
            raise PacketError("SUBACK properties outside the packet", field="properties")
        at = props[1] + props[0]
    return pid, packet.body[at:]


# -- encoders (what a subscriber sends) ---------------------------------------------------------


def remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return _U16.pack(len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + remaining_length(len(body)) + body


def connect(
    client_id: str,
    *,
    version: int = MQTT_311,
    clean: bool = False,
    keepalive_s: int = 30,
    username: str | None = None,
    password: str | None = None,
    session_expiry_s: int = 0,
) -> bytes:
    """CONNECT; ``clean`` False keeps the session (3.1.1 clean session off; 5: clean start
    off with ``session_expiry_s``)."""
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0) | (0x02 if clean else 0)
    body = _string("MQTT") + bytes([version, flags]) + _U16.pack(keepalive_s)
    if version >= MQTT_5:
        props = b"\x11" + struct.pack("!I", session_expiry_s) if session_expiry_s else b""
        body += remaining_length(len(props)) + props
    body += _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return _packet(CONNECT << 4, body)


def subscribe(packet_id: int, topic_filter: str, qos: int = 1, *, version: int = MQTT_311) -> bytes:
    body = _U16.pack(packet_id) + (b"\x00" if version >= MQTT_5 else b"") + _string(topic_filter) + bytes([qos])
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def puback(packet_id: int) -> bytes:
    """PUBACK (success; the same 4 bytes in 3.1.1 and 5)."""
    return b"\x40\x02" + _U16.pack(packet_id)


PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"


def publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0, retain: bool = False, version: int = MQTT_311) -> bytes:
    """PUBLISH (what tests and benchmarks send; the engine's reader only receives)."""
    var = _string(topic) + (_U16.pack(packet_id) if qos else b"") + (b"\x00" if version >= MQTT_5 else b"")
    return _packet((PUBLISH << 4) | (qos << 1) | int(retain), var + payload)


__all__ = [
    "CONNACK", "DISCONNECT", "DISCONNECT_BYTES", "MQTT_311", "MQTT_5", "PINGREQ_BYTES", "PINGRESP", "PUBLISH", "SUBACK",
    "Packet", "Publish", "connect", "puback", "publish", "read_connack", "read_suback", "remaining_length",
    "split_packets", "subscribe",
]  # fmt: skip
