"""The bulk ingest reader's packet splitter and parser (`stresswatch.mqtt_packets`): pure, so
checked by property: arbitrary bytes raise only PacketError, a stream split at any byte
boundaries gives the packets of the whole, and what the encoders write reads back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.errors import PacketError
from stresswatch.mqtt_packets import (
    CONNACK,
    MQTT_5,
    MQTT_311,
    PINGRESP,
    SUBACK,
    Packet,
    Publish,
    publish,
    read_connack,
    read_suback,
    remaining_length,
    split_packets,
)

versions = st.sampled_from([MQTT_311, MQTT_5])
topics = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda t: len(t.encode()) < 65535)


@st.composite
def publishes(draw, version):
    qos = draw(st.integers(0, 1))
    return Publish(
        draw(topics),
        draw(st.binary(max_size=300)),
        qos,
        draw(st.integers(1, 65535)) if qos else 0,
        False,
        draw(st.booleans()),
    )


@st.composite
def streams(draw):
    """A protocol version and the bytes of packets a broker may send a subscriber."""
    version = draw(versions)
    items = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["publish", "pingresp", "suback", "connack"]))
        if kind == "publish":
            p = draw(publishes(version))
            items.append((p, publish(p.topic, p.payload, qos=p.qos, packet_id=p.packet_id, retain=p.retain, version=version)))
        elif kind == "pingresp":
            items.append((Packet(PINGRESP, 0, b""), b"\xd0\x00"))
        elif kind == "suback":
            body = draw(st.binary(min_size=3, max_size=8))
            items.append((Packet(SUBACK, 0, body), bytes([0x90]) + remaining_length(len(body)) + body))
        else:
            body = bytes([draw(st.integers(0, 1)), draw(st.integers(0, 255))])
            items.append((Packet(CONNACK, 0, body), b"\x20\x02" + body))
    return version, items


def feed(data: bytes, cuts: list[int], version: int) -> list:
    """What the reader does: append each chunk to a buffer, take the complete packets, keep the rest."""
    out: list = []
    buf = bytearray()
    bounds = sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]
    at = 0
    for b in bounds:
        buf += data[at:b]
        at = b
        packets, used = split_packets(buf, version)
        del buf[:used]
        out += packets
    assert not buf  # nothing left over once the whole stream is in
    return out


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=20))
def test_a_stream_split_at_any_byte_boundaries_gives_the_packets_of_the_whole(stream, cuts):
    version, items = stream
    data = b"".join(raw for _, raw in items)
    whole, used = split_packets(data, version)
    assert used == len(data)
    assert whole == [p for p, _ in items]
    assert feed(data, cuts, version) == whole


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), versions)
def test_arbitrary_bytes_raise_only_the_projects_packet_error(data, version):
    try:
        packets, used = split_packets(data, version, max_packet_bytes=10_000)
    except PacketError:
        return
    assert 0 <= used <= len(data)
    for p in packets:
        assert isinstance(p, (Publish, Packet))
        if isinstance(p, Packet) and p.kind == CONNACK:
            try:
                read_connack(p)
            except PacketError:
                pass
        if isinstance(p, Packet) and p.kind == SUBACK:
            try:
                read_suback(p, version)
            except PacketError:
                pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), versions, st.integers(1, 399))
def test_arbitrary_bytes_split_anywhere_agree_with_the_whole(data, version, cut):
    """Whatever the bytes: reading them in two parts gives what reading them whole gives,
    or both refuse."""
    try:
        whole = split_packets(data, version)
    except PacketError:
        whole = None
    try:
        first, used = split_packets(data[:cut], version)
        rest, used2 = split_packets(data[used:], version)
        parts = (first + rest, used + used2)
    except PacketError:
        parts = None
    assert parts == whole


def test_an_incomplete_packet_waits_for_its_bytes():
    raw = publish("sw/ingest/alice", b"x" * 500, qos=1, packet_id=7)
    for n in range(len(raw)):
        assert split_packets(raw[:n]) == ([], 0)
    assert split_packets(raw) == ([Publish("sw/ingest/alice", b"x" * 500, 1, 7)], len(raw))


def test_malformed_packets_are_refused_with_the_reason():
    cases = {
        b"\x32\xff\xff\xff\xff\x01": "longer than 4 bytes",  # a 5-byte remaining length
        b"\x36\x04\x00\x01a\x00": "QoS 3",
        b"\x32\x05\x00\x09abc": "topic length",
        b"\x32\x05\x00\x01a\x00\x00": "packet id 0",
        b"\x32\x04\x00\x02\xff\xfe": "not UTF-8",
        b"\x10\x00": "not sent by a broker",  # a CONNECT from the broker
        b"\x82\x00": "not sent by a broker",  # a SUBSCRIBE
    }
    for data, why in cases.items():
        with pytest.raises(PacketError, match=why):
            split_packets(data)
    # MQTT 5: the property block must fit in the packet
    with pytest.raises(PacketError, match="properties"):
        split_packets(b"\x30\x04\x00\x01a\x09", MQTT_5)


def test_a_packet_over_the_limit_is_refused_from_its_header_alone():
    head = b"\x32" + remaining_length(5_000_000)
    with pytest.raises(PacketError, match="exceeds"):
        split_packets(head, max_packet_bytes=1_000_000)
    assert split_packets(head, max_packet_bytes=6_000_000) == ([], 0)  # under the limit: wait for it


def test_mqtt5_properties_are_skipped_and_the_payload_kept():
    props = b"\x01\x01" + b"\x02\x00\x00\x00\x3c"  # payload format indicator, message expiry
    body = b"\x00\x03a/b" + b"\x00\x2a" + bytes([len(props)]) + props + b"payload"
    (p,), _ = split_packets(b"\x32" + remaining_length(len(body)) + body, MQTT_5)
    assert p == Publish("a/b", b"payload", 1, 42)
    assert read_suback(Packet(SUBACK, 0, b"\x00\x01\x00\x01"), MQTT_5) == (1, b"\x01")
    assert read_connack(Packet(CONNACK, 0, b"\x01\x00\x00")) == (True, 0)
