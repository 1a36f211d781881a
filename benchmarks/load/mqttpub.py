"""A minimal MQTT 3.1.1 QoS 1 publisher over a raw socket, for the load harness.

Why not paho: at tens of thousands of messages per second paho's per-message Python work
(packet objects, callbacks, its own thread) would load the machine as much as the engine
under test. Here a PUBLISH packet is a few ``bytes`` joins, many are sent with one
``sendall``, and PUBACKs are only counted (after CONNACK the broker sends this client nothing
but 4-byte PUBACKs: no keepalive pings, no subscriptions).
"""

from __future__ import annotations

import socket
import struct
import time


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class RawPublisher:
    """One MQTT connection: ``queue(topic, payload)`` then ``flush()``; ``acked`` counts PUBACKs."""

    MAX_INFLIGHT = 30_000  # packet ids are 16-bit: never reuse one still unacknowledged

    def __init__(
        self, host: str, port: int, client_id: str, *, username: str | None = None, password: str | None = None, timeout_s: float = 10.0
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)  # clean session
        body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + _utf8(client_id)  # no keepalive
        body += (_utf8(username) if username is not None else b"") + (_utf8(password) if password is not None else b"")
        self.sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"CONNACK refused: {connack!r}")
        self.sock.setblocking(False)
        self.sent = 0
        self.acked = 0
        self._rx = 0
        self._pid = 0
        self._out: list[bytes] = []

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def queue(self, topic: bytes, payload: bytes) -> None:
        """Add one QoS 1 PUBLISH (topic already UTF-8)."""
        self._pid = self._pid % 65535 + 1
        var = struct.pack("!H", len(topic)) + topic + struct.pack("!H", self._pid)
        self._out.append(b"\x32" + _remaining_length(len(var) + len(payload)) + var + payload)

    def poll(self) -> None:
        """Count PUBACKs received so far (non-blocking)."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                raise ConnectionError("broker closed the connection")
            self._rx += len(data)
        self.acked = self._rx // 4

    def flush(self) -> None:
        """Send everything queued (blocking until the kernel took it), counting acks meanwhile."""
        if not self._out:
            self.poll()
            return
        while self.sent - self.acked > self.MAX_INFLIGHT:
            time.sleep(0.001)
            self.poll()
        data = memoryview(b"".join(self._out))
        self.sent += len(self._out)
        self._out.clear()
        while data:
            self.poll()
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                time.sleep(0.0005)
                continue
            data = data[n:]
        self.poll()

    def wait_acks(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.acked < self.sent and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.005)
        return self.acked >= self.sent

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()
