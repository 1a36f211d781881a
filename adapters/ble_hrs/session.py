"""Drives an :class:`~.client.HrsClient` through the reconnection state machine and turns
notifications into readings (parsed values + per-beat timestamps) and gaps.

The same code path serves the radio and replays: only the client differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

import polars as pl

from stresswatch.errors import ParseError
from stresswatch.model import SAMPLES_SCHEMA, Metric

from . import reconnect as rc
from .client import BleError, HrsClient
from .parser import (
    BodySensorLocation,
    HeartRateMeasurement,
    SensorContact,
    parse_body_sensor_location,
    parse_heart_rate_measurement,
)
from .recording import RecordedEvent
from .timing import BeatClock, BeatClockConfig, place_beats, reset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One notification: its arrival, the parsed value, and a timestamp per RR interval."""

    arrival_ns: int
    measurement: HeartRateMeasurement
    beat_ns: tuple[int, ...]
    watermark_ns: int = 0  # every later sample of this session is after this time


@dataclass(frozen=True)
class Gap:
    """No usable data from ``start_ns`` to ``end_ns``: ``disconnected`` or ``no_contact``."""

    start_ns: int
    end_ns: int
    reason: str


@dataclass(frozen=True)
class Rejected:
    """A notification that did not parse (kept as a count; the stream goes on)."""

    arrival_ns: int
    error: str


@dataclass(frozen=True)
class LinkLost:
    """The device link dropped at ``t_ns`` (the gap itself is reported when it ends)."""

    t_ns: int


SessionItem = Reading | Gap | Rejected | LinkLost
HOLDBACK_NS = 5 * 10**9


def _rows(item: Reading) -> Iterable[tuple[int, str, float]]:
    m = item.measurement
    if m.hr_bpm is not None:
        yield item.arrival_ns, Metric.HR_BPM.value, float(m.hr_bpm)
    for rr, t in zip(m.rr_ms, item.beat_ns):
        if rr is not None and t >= 0:
            yield t, Metric.RR_MS.value, rr


def _frame(rows: list[tuple[int, str, float]], user: str, source: str) -> pl.DataFrame:
    n = len(rows)
    return pl.DataFrame(
        {
            "user": [user] * n,
            "time": pl.Series([r[0] for r in rows], dtype=pl.Int64).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": [r[1] for r in rows],
            "value": pl.Series([r[2] for r in rows], dtype=pl.Float64),
            "source": [source] * n,
        },
        schema=SAMPLES_SCHEMA,
    )


class SampleAssembler:
    """Turns readings into samples frames that are in time order *across* frames.

    A strap notifies on its own schedule (e.g. 1 Hz), so the next notification's first beat
    can precede this notification's arrival (where its HR sample is stamped). Rows are held
    back until the reading's ``watermark_ns`` proves nothing earlier can still come; a row
    that would still go backwards (pathological input) is moved just after the last one
    emitted, so downstream windowing always sees a time-ordered stream. Memory: the rows of
    the last few seconds.
    """

    def __init__(self, *, user: str, source: str = "ble_hrs") -> None:
        self.user = user
        self.source = source
        self._held: list[tuple[int, str, float]] = []
        self._watermark = -1
        self._last = -1

    def add(self, item: SessionItem) -> None:
        if isinstance(item, Reading):
            self._held.extend(_rows(item))
            self._watermark = max(self._watermark, item.watermark_ns)

    def _emit(self, rows: list[tuple[int, str, float]]) -> pl.DataFrame:
        rows.sort(key=lambda r: r[0])
        out = []
        for t, metric, value in rows:
            t = max(t, self._last)
            out.append((t, metric, value))
            self._last = t
        return _frame(out, self.user, self.source)

    def ready(self) -> pl.DataFrame:
        """Rows no later sample can precede."""
        now = [r for r in self._held if r[0] <= self._watermark]
        self._held = [r for r in self._held if r[0] > self._watermark]
        return self._emit(now)

    def flush(self) -> pl.DataFrame:
        rows, self._held = self._held, []
        return self._emit(rows)


def readings_to_samples(items: Iterable[SessionItem], *, user: str, source: str = "ble_hrs") -> pl.DataFrame:
    """Samples rows (SPEC): ``hr_bpm`` at each arrival, ``rr_ms`` at the beat ending each
    interval, sorted by time. Missing data (no contact, implausible) produces no row at all."""
    assembler = SampleAssembler(user=user, source=source)
    for item in items:
        assembler.add(item)
    return assembler.flush()


class HrsSession:
    """Connect to the enrolled device, keep reconnecting, and yield :data:`SessionItem` s.

    ``on_raw`` sees every radio event as recorded (for ``stresswatch record``). Notifications
    from a previous connection (a late callback) are dropped and counted in ``stale``.
    """

    def __init__(
        self,
        client: HrsClient,
        enrolled_address: str,
        *,
        policy: rc.BackoffPolicy = rc.BackoffPolicy(),
        beat_config: BeatClockConfig = BeatClockConfig(),
        on_raw: Callable[[RecordedEvent], None] | None = None,
        source_name: str = "ble",
    ) -> None:
        self.client = client
        self.policy = policy
        self.beat_config = beat_config
        self.on_raw = on_raw
        self.source_name = source_name
        self.state = rc.LinkState(enrolled_address)
        self.location: BodySensorLocation | None = None
        self.stale = 0
        self.rejected = 0
        self.gaps: list[Gap] = []
        self._queue: asyncio.Queue[tuple[str, int, int, bytes]] = asyncio.Queue()
        self._beats = BeatClock()
        self._contact_lost_ns: int | None = None
        self._stop = False
        self._scans_ok = 0

    def stop(self) -> None:
        self._stop = True
        self._queue.put_nowait(("stop", -1, self.client.clock.now_ns(), b""))

    def _now_s(self) -> float:
        return self.client.clock.now_ns() / 1e9

    def _raw(self, t_ns: int, ev: str, data: bytes = b"") -> None:
        if self.on_raw:
            self.on_raw(RecordedEvent(t_ns, ev, data))

    async def run(self) -> AsyncIterator[SessionItem]:
        pending: list[rc.Event] = [rc.Start()]
        while True:
            while pending:
                event = pending.pop(0)
                self.state, actions = rc.step(self.state, event, self._now_s(), self.policy)
                for action in actions:
                    async for item in self._execute(action, pending):
                        yield item
            if self.state.phase is rc.Phase.STOPPED:
                return
            if self._stop:
                pending.append(rc.Stop())
                continue
            if self.state.phase is rc.Phase.STREAMING:
                kind, epoch, t_ns, data = await self._queue.get()
                if kind == "stop":
                    pending.append(rc.Stop())
                elif epoch != self.state.epoch:
                    self.stale += 1  # a callback of a connection that is gone: never twice
                elif kind == "notify":
                    pending.append(rc.NotificationSeen(epoch))
                    for item in self._reading(t_ns, data):
                        yield item
                elif kind == "disconnected":
                    self._raw(t_ns, "disconnected")
                    pending.append(rc.Disconnected(epoch))
                    yield LinkLost(t_ns)
                    if self._contact_lost_ns is not None:
                        yield self._gap(self._contact_lost_ns, t_ns, "no_contact")
                        self._contact_lost_ns = None
            elif self.state.phase is rc.Phase.BACKOFF:
                if await self.client.finished():
                    pending.append(rc.Stop())
                    continue
                assert self.state.retry_at_s is not None
                await self.client.clock.sleep_until_ns(int(self.state.retry_at_s * 1e9))
                pending.append(rc.Tick())
            else:  # pragma: no cover - every other phase is left by an action's outcome
                raise AssertionError(f"stuck in {self.state.phase}")

    def _gap(self, start_ns: int, end_ns: int, reason: str) -> Gap:
        gap = Gap(start_ns, end_ns, reason)
        self.gaps.append(gap)
        return gap

    async def _execute(self, action: rc.Action, pending: list[rc.Event]) -> AsyncIterator[SessionItem]:
        if isinstance(action, rc.StartScan):
            if await self.client.finished():
                pending.append(rc.Stop())
                return
            try:
                devices = await self.client.scan(action.timeout_s)
                self._scans_ok += 1
            except BleError as exc:
                if self._scans_ok == 0:
                    raise  # no working radio at all (no adapter, no BlueZ): say so, do not spin
                log.warning("ble: scan failed: %s", exc)  # a radio that worked before: retry with backoff
                devices = []
            pending.extend(rc.DeviceFound(d.address) for d in devices)
            pending.append(rc.ScanTimeout())  # ignored once a DeviceFound moved us on
        elif isinstance(action, rc.Connect):
            epoch = action.epoch

            def on_disconnect(t_ns: int, epoch: int = epoch) -> None:
                self._queue.put_nowait(("disconnected", epoch, t_ns, b""))

            try:
                await self.client.connect(action.address, on_disconnect)
            except BleError as exc:
                log.info("ble: connect failed: %s", exc)
                pending.append(rc.ConnectFailed(epoch, str(exc)))
                return
            self._raw(self.client.clock.now_ns(), "connected")
            loc = await self.client.read_body_sensor_location()
            if loc is not None:
                self._raw(self.client.clock.now_ns(), "location", loc)
                try:
                    self.location = parse_body_sensor_location(loc, source=self.source_name)
                except ParseError as exc:
                    log.info("ble: %s", exc)
            pending.append(rc.Connected(epoch))
        elif isinstance(action, rc.Subscribe):
            epoch = action.epoch

            def on_notify(data: bytes, t_ns: int, epoch: int = epoch) -> None:
                self._queue.put_nowait(("notify", epoch, t_ns, data))

            try:
                await self.client.subscribe(on_notify)
            except BleError as exc:
                log.info("ble: subscribe failed: %s", exc)
                pending.append(rc.ConnectFailed(epoch, str(exc)))
                return
            pending.append(rc.Subscribed(epoch))
        elif isinstance(action, rc.Disconnect):
            await self.client.disconnect()
        elif isinstance(action, rc.ResetBeatClock):
            self._beats = reset(self._beats)
        elif isinstance(action, rc.RecordGap):
            yield self._gap(int(action.start_s * 1e9), int(action.end_s * 1e9), action.reason)
        # StopScan / ScheduleTick: scans are bounded calls here, ticks are slept in run()

    def _watermark(self, arrival_ns: int) -> int:
        # Later HR samples are after this arrival, later beats after the last placed beat
        # (beat times only increase). Before any beat, allow a new chain's first notification
        # to reach back HOLDBACK_NS.
        last_beat = self._beats.last_beat_ns
        return min(arrival_ns, last_beat) if last_beat is not None else arrival_ns - HOLDBACK_NS

    def _reading(self, t_ns: int, data: bytes) -> Iterable[SessionItem]:
        self._raw(t_ns, "notify", data)
        try:
            m = parse_heart_rate_measurement(data, source=self.source_name)
        except ParseError as exc:
            self.rejected += 1
            return [Rejected(t_ns, str(exc))]
        out: list[SessionItem] = []
        if m.sensor_contact is SensorContact.NO_CONTACT:
            self._beats = reset(self._beats)  # intervals measured without contact are noise
            if self._contact_lost_ns is None:
                self._contact_lost_ns = t_ns
            return [Reading(t_ns, m, tuple(-1 for _ in m.rr_1024), self._watermark(t_ns))]
        if self._contact_lost_ns is not None:
            out.append(self._gap(self._contact_lost_ns, t_ns, "no_contact"))
            self._contact_lost_ns = None
        self._beats, beats = place_beats(self._beats, t_ns, m.rr_1024, self.beat_config)
        out.append(Reading(t_ns, m, tuple(beats), self._watermark(t_ns)))
        return out
