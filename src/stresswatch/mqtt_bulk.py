"""A subscriber that reads many PUBLISH packets per socket read: the engine's bulk ingest reader.

paho spends about 270 µs of Python per received message in the engine (benchmarks/RESULTS.md):
packet objects, MQTT 5 property parsing, locks and callbacks, one message at a time. This
client reads up to ``read_bytes`` per ``recv``, splits every complete packet in the buffer
(:func:`stresswatch.mqtt_packets.split_packets`) and hands the PUBLISHes of one read to the
caller together. It does one job only: hold a persistent session subscribed to one topic
filter at QoS 1, and send a PUBACK only when the caller says the message is durable
(:meth:`BulkSubscriber.ack`, any thread). PUBACKs queued by one call of :meth:`flush_acks`
go out in one write.

Same meanings as :func:`stresswatch.mqtt.connect` for the address, TLS (``mqtts://`` with
``cafile``) and credentials; ``protocol`` ``"5"`` or ``"3.1.1"`` forces one, and ``"auto"``
is 3.1.1 here (the reader needs nothing of MQTT 5; with a persistent 3.1.1 session the
broker's ``persistent_client_expiration`` bounds the session, 7 days in the generated
configuration). A refused account raises :class:`~stresswatch.mqtt.NotAuthorised`.
After a lost connection it reconnects by itself (1 s, doubling up to ``reconnect_max_s``) and
subscribes again; PUBACKs of messages received on an earlier connection are dropped (the
broker delivers those messages again, and the caller's de-duplication acknowledges the copy).

All socket I/O happens on the reader's thread (TLS objects must not be shared between
threads); :meth:`ack` only queues, and :meth:`flush_acks` wakes the thread.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .errors import PacketError, TransportError
from .mqtt import PROTOCOLS, BrokerAddress, Credentials, refusal
from .mqtt_packets import (
    DISCONNECT,
    DISCONNECT_BYTES,
    MQTT_5,
    MQTT_311,
    PINGREQ_BYTES,
    SUBACK,
    Packet,
    Publish,
    connect as connect_packet,
    puback,
    read_connack,
    read_suback,
    split_packets,
    subscribe as subscribe_packet,
)

log = logging.getLogger(__name__)

OnPublishes = Callable[[list[Publish], int], None]  # (the PUBLISHes of one read, connection number)

# CONNACK codes (3.1.1 return codes 1-5; MQTT 5 reason codes) in the words paho uses, so that
# stresswatch.mqtt.refusal says the same thing whichever client was refused.
_CONNACK_REASONS = {
    1: "unsupported protocol version", 2: "client identifier not valid", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
}  # fmt: skip
_VERSIONS = {5: MQTT_5, 4: MQTT_311}


class BulkSubscriber:
    def __init__(
        self,
        url: str,
        client_id: str,
        topic_filter: str,
        on_publishes: OnPublishes,
        *,
        username: str | None = None,
        password: str | None = None,
        password_file: str | Path | None = None,
        protocol: str = "auto",
        session_expiry_s: int = 7 * 24 * 3600,
        keepalive_s: int = 30,
        timeout_s: float = 10.0,
        reconnect_max_s: float = 10.0,
        ca_file: str | None = None,
        read_bytes: int = 1 << 20,
        max_packet_bytes: int = 16 << 20,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise TransportError(f"unknown MQTT protocol {protocol!r}: use auto, 5 or 3.1.1")
        self.addr = BrokerAddress.parse(url)
        self.client_id = client_id
        self.topic_filter = topic_filter
        self._on_publishes = on_publishes
        self._creds = Credentials.resolve(self.addr, username, password, password_file)
        self._ca_file = ca_file or self.addr.ca_file
        # "auto": 3.1.1. The reader uses nothing of MQTT 5 (it skips the properties), every
        # broker speaks 3.1.1, and amqtt (the demo's broker) hangs on this client's MQTT 5
        # CONNECT instead of refusing it, so trying 5 first would cost a timeout there.
        self._versions = [MQTT_311] if protocol == "auto" else [_VERSIONS[5 if v == 5 else 4] for v in PROTOCOLS[protocol]]
        self._version = self._versions[0]
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._reconnect_max_s = reconnect_max_s
        self._read_bytes = read_bytes
        self._max_packet_bytes = max_packet_bytes
        self._on_reconnect = on_reconnect
        self._lock = threading.Lock()
        self._acks: list[bytes] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._carry = b""
        self._early: list[Publish] = []
        self.generation = 0  # connection number: acks of an earlier connection are dropped
        self.connected = threading.Event()
        self.reads = 0
        self.messages = 0
        self.malformed = 0
        self._thread = threading.Thread(target=self._run, name=f"mqtt-bulk-{client_id}", daemon=True)

    def start(self) -> BulkSubscriber:
        """Connect and subscribe, then read on the reader's thread. The first attempt raises
        (:class:`TransportError`, :class:`~stresswatch.mqtt.NotAuthorised`): a wrong URL or
        account is the caller's to see; later ones are retried."""
        self._sock = self._connect_any()
        self._thread.start()
        return self

    # -- the caller's side -------------------------------------------------------------
    @property
    def version(self) -> int:
        """The MQTT protocol level of the current connection (4: 3.1.1, 5: MQTT 5)."""
        return self._version

    def ack(self, packet_id: int, generation: int, then: bytes = b"") -> None:
        """Queue a PUBACK for a message of connection ``generation`` (any thread), followed by
        the packet(s) ``then`` (the engine's confirmation); sent at the next :meth:`flush_acks`."""
        data = puback(packet_id) + then
        with self._lock:
            if generation == self.generation:
                self._acks.append(data)

    def send(self, data: bytes) -> None:
        """Send ``data`` (whole packets) on the current connection, after the queued PUBACKs
        (any thread); dropped while disconnected."""
        with self._lock:
            if self.connected.is_set():
                self._acks.append(data)
        self.flush_acks()

    def flush_acks(self) -> None:
        """Have the reader's thread send every queued PUBACK now (any thread)."""
        try:
            self._wake_w.send(b"\x00")
        except (BlockingIOError, OSError):
            pass  # already woken (the pipe is full) or closing

    def close(self) -> None:
        """Send the queued PUBACKs and DISCONNECT (the broker keeps the session)."""
        self._stop.set()
        self.flush_acks()
        if self._thread.is_alive():
            self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()

    # -- connection --------------------------------------------------------------------
    def _connect_any(self) -> socket.socket:
        error: TransportError = TransportError("no answer", url=str(self.addr))
        for version in self._versions:
            try:
                return self._connect(version)
            except TransportError as exc:
                error = exc
                if "protocol" not in str(exc):
                    break
        raise error

    def _connect(self, version: int) -> socket.socket:
        try:
            raw = socket.create_connection((self.addr.host, self.addr.port), timeout=self._timeout_s)
        except OSError as exc:
            raise TransportError(f"cannot connect: {exc}", url=str(self.addr)) from None
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.addr.tls:
                ctx = ssl.create_default_context(cafile=self._ca_file)
                sock = ctx.wrap_socket(raw, server_hostname=self.addr.host)
            sock.sendall(
                connect_packet(
                    self.client_id, version=version, clean=False, keepalive_s=self._keepalive_s,
                    username=self._creds.username, password=self._creds.password if self._creds.username else None,
                    session_expiry_s=self._session_expiry_s,
                )  # fmt: skip
            )
            buf = bytearray()
            queued: deque[Publish | Packet] = deque()
            present, code = read_connack(self._next_packet(sock, buf, version, queued))
            if code:
                raise refusal(_CONNACK_REASONS.get(code, f"reason {code}"), self.addr, self._creds)
            sock.sendall(subscribe_packet(1, self.topic_filter, 1, version=version))
            early: list[Publish] = []
            while True:  # a persistent session may deliver queued messages before the SUBACK
                packet = self._next_packet(sock, buf, version, queued)
                if isinstance(packet, Publish):
                    early.append(packet)
                elif packet.kind == SUBACK:
                    _, codes = read_suback(packet, version)
                    if not codes or codes[0] > 2:
                        raise TransportError(f"subscription to {self.topic_filter!r} refused (code {codes[:1].hex()})", url=str(self.addr))
                    break
            early += [p for p in queued if isinstance(p, Publish)]
        except (OSError, PacketError) as exc:
            sock.close()
            raise TransportError(f"cannot connect: {exc}", url=str(self.addr)) from None
        except TransportError:
            sock.close()
            raise
        with self._lock:
            self.generation += 1
            self._acks.clear()
        self._version = version
        self._carry = bytes(buf)
        self._early = early
        self.connected.set()
        return sock

    def _next_packet(self, sock: socket.socket, buf: bytearray, version: int, queued: deque[Publish | Packet]) -> Publish | Packet:
        """The next packet during the handshake (blocking, at most ``timeout_s``)."""
        deadline = time.monotonic() + self._timeout_s
        while not queued:
            packets, used = split_packets(buf, version, max_packet_bytes=self._max_packet_bytes)
            del buf[:used]
            queued.extend(packets)
            if queued:
                break
            if time.monotonic() > deadline:
                raise TransportError(f"no answer within {self._timeout_s:g} s", url=str(self.addr))
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise TransportError("the broker closed the connection", url=str(self.addr))
            buf += data
        return queued.popleft()

    # -- the reader's thread -----------------------------------------------------------
    def _run(self) -> None:
        delay_s = 1.0
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                try:
                    sock = self._sock = self._connect_any()
                except TransportError as exc:
                    log.warning("ingest: %s; retrying in %.0f s", exc, delay_s)
                    self._stop.wait(delay_s)
                    delay_s = min(delay_s * 2, self._reconnect_max_s)
                    continue
                if self._on_reconnect is not None:
                    self._on_reconnect()
            began = time.monotonic()
            try:
                self._serve(sock)
            except (OSError, PacketError, TransportError) as exc:
                if isinstance(exc, PacketError):
                    self.malformed += 1
                if not self._stop.is_set():
                    log.warning("ingest: connection to %s lost (%s); reconnecting", self.addr, exc)
            finally:
                self.connected.clear()
                with self._lock:
                    self.generation += 1  # acks of this connection's messages must not reach the next
                    self._acks.clear()
                try:
                    sock.close()
                except OSError:
                    pass
                self._sock = None
            if time.monotonic() - began < self._reconnect_max_s:  # dropped soon after connecting: back off
                self._stop.wait(delay_s)
                delay_s = min(delay_s * 2, self._reconnect_max_s)
            else:
                delay_s = 1.0

    def _serve(self, sock: socket.socket) -> None:
        version = self._version
        buf = bytearray(self._carry)
        early, self._early = self._early, []
        with self._lock:
            generation = self.generation
        if early:
            self._dispatch(list(early), generation, sock)
        sel = selectors.DefaultSelector()
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        keepalive = self._keepalive_s
        last_sent = last_heard = time.monotonic()
        try:
            while True:
                if buf:  # bytes read during the handshake, or a previous read's tail
                    packets, used = split_packets(buf, version, max_packet_bytes=self._max_packet_bytes)
                    if used:
                        del buf[:used]
                        self._dispatch(packets, generation, sock)
                pending_tls = isinstance(sock, ssl.SSLSocket) and sock.pending()
                events = [] if pending_tls else sel.select(timeout=max(0.5, keepalive / 4))
                woke = any(key.fileobj is self._wake_r for key, _ in events)
                if woke:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                with self._lock:
                    acks, self._acks = self._acks, []
                if acks:
                    self._send(sock, b"".join(acks))
                    last_sent = time.monotonic()
                if self._stop.is_set():
                    self._send(sock, DISCONNECT_BYTES)
                    return
                if pending_tls or any(key.fileobj is sock for key, _ in events):
                    try:
                        data = sock.recv(self._read_bytes)
                    except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                        data = None
                    if data is not None:
                        if not data:
                            raise TransportError("the broker closed the connection", url=str(self.addr))
                        last_heard = time.monotonic()
                        self.reads += 1
                        buf += data
                        continue
                now = time.monotonic()
                if now - last_heard > 1.5 * keepalive:
                    raise TransportError(f"nothing from the broker for {now - last_heard:.0f} s", url=str(self.addr))
                if now - last_sent > keepalive / 2:
                    self._send(sock, PINGREQ_BYTES)
                    last_sent = now
        finally:
            sel.close()

    def _dispatch(self, packets: list[Publish | Packet], generation: int, sock: socket.socket) -> None:
        publishes = [p for p in packets if isinstance(p, Publish)]
        for p in packets:
            if isinstance(p, Packet) and p.kind == DISCONNECT:
                raise TransportError(f"the broker disconnected us (reason {p.body[:1].hex() or '00'})", url=str(self.addr))
        if publishes:
            self.messages += len(publishes)
            try:
                self._on_publishes(publishes, generation)
            except Exception:  # noqa: BLE001 - the reader must keep reading; unacknowledged messages come again
                log.exception("ingest: handling %d message(s) failed", len(publishes))

    def _send(self, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self._timeout_s
        while view:
            try:
                n = sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError, InterruptedError):
                if time.monotonic() > deadline:
                    raise TransportError("the broker does not read what we send", url=str(self.addr)) from None
                time.sleep(0.001)
                continue
            view = view[n:]


__all__ = ["BulkSubscriber", "OnPublishes"]
