"""The radio seam: a small abstract client, the bleak implementation, and the replaying fake.

The session (:mod:`.session`) only talks to :class:`HrsClient`. Tests and ``--replay`` use
:class:`ReplayClient`, which plays a recording (:mod:`.recording`) on a virtual clock, with
its recorded disconnects, through the same session, state machine and parser; only the
radio is replaced.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from stresswatch.errors import StresswatchError
from stresswatch.extras import require

from .parser import BODY_SENSOR_LOCATION_UUID, HEART_RATE_MEASUREMENT_UUID, HEART_RATE_SERVICE_UUID
from .recording import Recording

OnNotify = Callable[[bytes, int], None]  # (value, arrival time ns)
OnDisconnect = Callable[[int], None]  # (time ns)


def mask_address(address: str) -> str:
    """Device addresses identify a person's strap: keep only the last two bytes for display."""
    parts = address.split(":")
    return "…:" + ":".join(parts[-2:]) if len(parts) > 2 else "…" + address[-4:]


class BleError(StresswatchError):
    """The radio or the device failed (no adapter, connection refused, characteristic missing)."""

    exit_code = 69  # EX_UNAVAILABLE


@dataclass(frozen=True)
class DeviceInfo:
    address: str
    name: str | None
    rssi_dbm: int | None
    services: tuple[str, ...]


class RadioClock(abc.ABC):
    """The radio's timeline: notification arrival times and waits, real for the radio and
    virtual for replays.

    Not the core's :data:`stresswatch.clock.Clock` (a callable returning an aware UTC
    datetime) because the radio needs two things that one lacks: arrival times as integer
    nanoseconds (they become sample times and beat timing without rounding) and an awaitable
    :meth:`sleep_until_ns` that a replay completes instantly by advancing virtual time.
    """

    @abc.abstractmethod
    def now_ns(self) -> int: ...

    @abc.abstractmethod
    async def sleep_until_ns(self, t_ns: int) -> None: ...


class WallRadioClock(RadioClock):
    """Arrival times from the system clock (``time.time_ns``); waits really wait."""

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep_until_ns(self, t_ns: int) -> None:
        await asyncio.sleep(max(t_ns - time.time_ns(), 0) / 1e9)


class HrsClient(abc.ABC):
    """What the session needs from a Heart Rate Service client. One connection at a time."""

    clock: RadioClock

    @abc.abstractmethod
    async def scan(self, timeout_s: float) -> list[DeviceInfo]:
        """Devices advertising the Heart Rate Service (0x180D)."""

    @abc.abstractmethod
    async def connect(self, address: str, on_disconnect: OnDisconnect) -> None:
        """Connect to ``address``; ``on_disconnect`` fires once if the link drops later."""

    @abc.abstractmethod
    async def read_body_sensor_location(self) -> bytes | None:
        """The raw 0x2A38 value, or None when the device does not have it."""

    @abc.abstractmethod
    async def subscribe(self, on_notify: OnNotify) -> None:
        """Enable 0x2A37 notifications on the current connection."""

    @abc.abstractmethod
    async def disconnect(self) -> None: ...

    async def finished(self) -> bool:
        """True when no more data can ever come (a replay reached its end). The radio: never."""
        return False


class BleakHrsClient(HrsClient):
    """The real radio through bleak (BlueZ, CoreBluetooth, WinRT)."""

    def __init__(self, clock: RadioClock | None = None) -> None:
        require("bleak", extra="ble", feature="a Bluetooth device (stresswatch pair, stream, record)")
        self.clock = clock or WallRadioClock()
        self._client: object | None = None

    async def scan(self, timeout_s: float) -> list[DeviceInfo]:
        from bleak import BleakScanner
        from bleak.exc import BleakError

        try:
            found = await BleakScanner.discover(timeout=timeout_s, service_uuids=[HEART_RATE_SERVICE_UUID], return_adv=True)
        except (BleakError, OSError) as exc:
            raise BleError(f"cannot scan for Bluetooth devices (no adapter, or BlueZ not running?): {exc}") from None
        out = []
        for device, adv in found.values():
            services = tuple(adv.service_uuids or ())
            if HEART_RATE_SERVICE_UUID not in [s.lower() for s in services]:
                continue
            out.append(DeviceInfo(device.address, adv.local_name or device.name, adv.rssi, services))
        return sorted(out, key=lambda d: -(d.rssi_dbm or -999))

    async def connect(self, address: str, on_disconnect: OnDisconnect) -> None:
        from bleak import BleakClient
        from bleak.exc import BleakError

        client = BleakClient(address, disconnected_callback=lambda _c: on_disconnect(self.clock.now_ns()))
        try:
            await client.connect()
        except (BleakError, OSError, asyncio.TimeoutError) as exc:
            reason = str(exc).replace(address, mask_address(address)) or type(exc).__name__
            raise BleError(f"cannot connect to {mask_address(address)}: {reason}") from None
        self._client = client

    async def read_body_sensor_location(self) -> bytes | None:
        from bleak.exc import BleakError

        client = self._client
        if client is None:
            return None
        try:
            return bytes(await client.read_gatt_char(BODY_SENSOR_LOCATION_UUID))  # type: ignore[attr-defined]
        except (BleakError, OSError):
            return None  # optional characteristic

    async def subscribe(self, on_notify: OnNotify) -> None:
        from bleak.exc import BleakError

        client = self._client
        if client is None:
            raise BleError("not connected")
        try:
            await client.start_notify(  # type: ignore[attr-defined]
                HEART_RATE_MEASUREMENT_UUID, lambda _char, data: on_notify(bytes(data), self.clock.now_ns())
            )
        except (BleakError, OSError) as exc:
            raise BleError(f"cannot subscribe to heart rate notifications: {exc}") from None

    async def disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - the link is going away either way
                pass


class VirtualRadioClock(RadioClock):
    """Replay time: starts at the recording's first event; ``speed`` > 0 also sleeps for real
    (``speed`` times faster than recorded), 0 runs as fast as possible."""

    def __init__(self, start_ns: int, speed: float = 0.0) -> None:
        self._now = start_ns
        self.speed = speed

    def now_ns(self) -> int:
        return self._now

    async def sleep_until_ns(self, t_ns: int) -> None:
        if t_ns <= self._now:
            await asyncio.sleep(0)
            return
        if self.speed > 0:
            await asyncio.sleep((t_ns - self._now) / 1e9 / self.speed)
        else:
            await asyncio.sleep(0)
        self._now = t_ns


class ReplayClient(HrsClient):
    """Plays a recording as if it were the radio.

    The recorded device advertises whenever the recording is not inside a disconnected span;
    ``connect`` succeeds at the next recorded ``connected`` event; notifications are delivered
    at their recorded arrival times after ``subscribe``; a recorded ``disconnected`` drops the
    link (``on_disconnect``). After the last event :meth:`finished` is True.
    """

    def __init__(self, recording: Recording, *, speed: float = 0.0, rssi_dbm: int = -60) -> None:
        self.recording = recording
        events = recording.events
        self.clock = VirtualRadioClock(events[0].t_ns if events else 0, speed)
        self._events = events
        self._i = 0  # next event to deliver
        self._rssi = rssi_dbm
        self._connected = False
        self._pump: asyncio.Task[None] | None = None
        self._on_disconnect: OnDisconnect | None = None
        self.connects = 0
        self.subscriptions = 0

    def _advertising_at(self) -> int | None:
        """When the device can next be found: now if the link is up in the recording, else the
        time of the next recorded ``connected``; None if the recording has no more links."""
        for j in range(self._i, len(self._events)):
            ev = self._events[j]
            if ev.ev == "connected":
                return ev.t_ns
            if ev.ev in ("notify", "location"):
                return self.clock.now_ns()
        return None

    async def scan(self, timeout_s: float) -> list[DeviceInfo]:
        at = self._advertising_at()
        deadline = self.clock.now_ns() + int(timeout_s * 1e9)
        if at is None or at > deadline:
            await self.clock.sleep_until_ns(deadline)
            return []
        await self.clock.sleep_until_ns(at)
        return [DeviceInfo(self.recording.address, self.recording.name, self._rssi, ("0000180d-0000-1000-8000-00805f9b34fb",))]

    async def connect(self, address: str, on_disconnect: OnDisconnect) -> None:
        if address.upper() != self.recording.address.upper():
            raise BleError("no such device in the recording")
        at = self._advertising_at()
        if at is None:
            raise BleError("device gone (end of recording)")
        await self.clock.sleep_until_ns(at)
        while self._i < len(self._events) and self._events[self._i].ev == "connected":
            self._i += 1
        self._connected = True
        self._on_disconnect = on_disconnect
        self.connects += 1

    async def read_body_sensor_location(self) -> bytes | None:
        for j in range(self._i, len(self._events)):
            ev = self._events[j]
            if ev.ev == "location":
                return ev.data
            if ev.ev in ("disconnected", "connected"):
                break
        return None

    async def subscribe(self, on_notify: OnNotify) -> None:
        if not self._connected:
            raise BleError("not connected")
        self.subscriptions += 1
        self._pump = asyncio.get_running_loop().create_task(self._run(on_notify))

    async def _run(self, on_notify: OnNotify) -> None:
        while self._i < len(self._events):
            ev = self._events[self._i]
            if ev.ev == "connected":
                break  # a reconnect without a recorded disconnect: treat as a drop here
            await self.clock.sleep_until_ns(ev.t_ns)
            self._i += 1
            if ev.ev == "notify":
                on_notify(ev.data, ev.t_ns)
            elif ev.ev == "disconnected":
                break
        self._drop()

    def _drop(self) -> None:
        if self._connected:
            self._connected = False
            cb, self._on_disconnect = self._on_disconnect, None
            if cb:
                cb(self.clock.now_ns())

    async def disconnect(self) -> None:
        self._connected = False
        self._on_disconnect = None
        if self._pump and not self._pump.done():
            self._pump.cancel()

    async def finished(self) -> bool:
        if self._connected:
            return False
        past_the_end = not self._events or self.clock.now_ns() > self._events[-1].t_ns
        return past_the_end or self._advertising_at() is None
