"""Reconnection as an explicit, pure state machine: ``step(state, event, now_s) -> (state, actions)``.

Phases::

    IDLE --Start--> SCANNING --DeviceFound(enrolled)--> CONNECTING --Connected--> SUBSCRIBING
    SUBSCRIBING --Subscribed--> STREAMING --Disconnected--> BACKOFF --Tick(due)--> SCANNING
    CONNECTING --ConnectFailed--> BACKOFF;  SCANNING --ScanTimeout--> BACKOFF
    any --Stop--> STOPPED

* Only the enrolled address is ever connected: a ``DeviceFound`` for another address is
  ignored (the radio may see many straps in a gym).
* Backoff is capped exponential: ``min(cap_s, base_s * 2**(attempt-1))``, reset to the first
  step once a connection reaches STREAMING. No jitter: one companion talks to one device.
* Each connection gets a new ``epoch``. ``Subscribe`` is emitted once per epoch, so a resumed
  connection never registers a second notification handler; the driver drops notifications
  whose epoch is not the current one (late callbacks of a dead connection).
* Leaving STREAMING opens a gap at the last notification's time (or the disconnect time);
  reaching STREAMING again closes it with a ``RecordGap`` action. Gaps are data, not errors.

The driver (:mod:`.session`) executes the actions against a client and feeds back events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class Phase(enum.Enum):
    IDLE = "idle"
    SCANNING = "scanning"
    CONNECTING = "connecting"
    SUBSCRIBING = "subscribing"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class BackoffPolicy:
    base_s: float = 1.0
    cap_s: float = 60.0
    scan_timeout_s: float = 10.0

    def delay_s(self, attempt: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** min(max(attempt - 1, 0), 62))  # attempts grow without bound


# ---- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class DeviceFound:
    address: str


@dataclass(frozen=True)
class ScanTimeout:
    pass


@dataclass(frozen=True)
class Connected:
    epoch: int


@dataclass(frozen=True)
class ConnectFailed:
    epoch: int
    reason: str = ""


@dataclass(frozen=True)
class Subscribed:
    epoch: int


@dataclass(frozen=True)
class NotificationSeen:
    epoch: int


@dataclass(frozen=True)
class Disconnected:
    epoch: int


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Event = Start | DeviceFound | ScanTimeout | Connected | ConnectFailed | Subscribed | NotificationSeen | Disconnected | Tick | Stop

# ---- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartScan:
    timeout_s: float


@dataclass(frozen=True)
class StopScan:
    pass


@dataclass(frozen=True)
class Connect:
    address: str
    epoch: int


@dataclass(frozen=True)
class Subscribe:
    epoch: int


@dataclass(frozen=True)
class Disconnect:
    epoch: int


@dataclass(frozen=True)
class ScheduleTick:
    at_s: float


@dataclass(frozen=True)
class ResetBeatClock:
    """RR chains do not survive a disconnect (beats during the gap were never reported)."""


@dataclass(frozen=True)
class RecordGap:
    start_s: float
    end_s: float
    reason: str = "disconnected"


Action = StartScan | StopScan | Connect | Subscribe | Disconnect | ScheduleTick | ResetBeatClock | RecordGap


@dataclass(frozen=True)
class LinkState:
    enrolled_address: str
    phase: Phase = Phase.IDLE
    epoch: int = 0
    attempt: int = 0  # failed attempts since the last successful stream
    retry_at_s: float | None = None
    gap_start_s: float | None = None  # set while not streaming after having streamed
    last_seen_s: float | None = None  # last notification of the current epoch
    subscribed_epoch: int | None = None


def _same(a: str, b: str) -> bool:
    return a.strip().upper() == b.strip().upper()


def _backoff(state: LinkState, now_s: float, policy: BackoffPolicy) -> tuple[LinkState, list[Action]]:
    attempt = state.attempt + 1
    at = now_s + policy.delay_s(attempt)
    return replace(state, phase=Phase.BACKOFF, attempt=attempt, retry_at_s=at), [ScheduleTick(at)]


def step(
    state: LinkState, event: Event, now_s: float, policy: BackoffPolicy = BackoffPolicy()
) -> tuple[LinkState, list[Action]]:
    """The next state and the actions to carry out. Events that do not apply are ignored."""
    phase = state.phase
    if isinstance(event, Stop):
        actions: list[Action] = []
        if phase is Phase.SCANNING:
            actions.append(StopScan())
        if phase in (Phase.CONNECTING, Phase.SUBSCRIBING, Phase.STREAMING):
            actions.append(Disconnect(state.epoch))
        return replace(state, phase=Phase.STOPPED, retry_at_s=None), actions
    if phase is Phase.STOPPED:
        return state, []

    if isinstance(event, Start) and phase is Phase.IDLE:
        return replace(state, phase=Phase.SCANNING), [StartScan(policy.scan_timeout_s)]

    if isinstance(event, DeviceFound) and phase is Phase.SCANNING:
        if not _same(event.address, state.enrolled_address):
            return state, []  # never connect to a device the user did not enroll
        epoch = state.epoch + 1
        return replace(state, phase=Phase.CONNECTING, epoch=epoch), [StopScan(), Connect(state.enrolled_address, epoch)]

    if isinstance(event, ScanTimeout) and phase is Phase.SCANNING:
        return _backoff(state, now_s, policy)

    if isinstance(event, Connected) and phase is Phase.CONNECTING and event.epoch == state.epoch:
        if state.subscribed_epoch == state.epoch:  # already subscribed on this link: never twice
            return replace(state, phase=Phase.STREAMING), []
        return replace(state, phase=Phase.SUBSCRIBING), [Subscribe(state.epoch)]

    if isinstance(event, ConnectFailed) and phase in (Phase.CONNECTING, Phase.SUBSCRIBING) and event.epoch == state.epoch:
        return _backoff(state, now_s, policy)

    if isinstance(event, Subscribed) and phase is Phase.SUBSCRIBING and event.epoch == state.epoch:
        actions = []
        if state.gap_start_s is not None:
            actions.append(RecordGap(state.gap_start_s, now_s))
        return (
            replace(state, phase=Phase.STREAMING, attempt=0, retry_at_s=None, gap_start_s=None, subscribed_epoch=state.epoch),
            actions,
        )

    if isinstance(event, NotificationSeen) and phase is Phase.STREAMING and event.epoch == state.epoch:
        return replace(state, last_seen_s=now_s), []

    if isinstance(event, Disconnected) and event.epoch == state.epoch and phase in (
        Phase.CONNECTING,
        Phase.SUBSCRIBING,
        Phase.STREAMING,
    ):
        gap_start = state.gap_start_s
        actions = [ResetBeatClock()]
        if phase is Phase.STREAMING:
            gap_start = state.last_seen_s if state.last_seen_s is not None else now_s
        nxt, more = _backoff(replace(state, gap_start_s=gap_start, last_seen_s=None), now_s, policy)
        return nxt, actions + more

    if isinstance(event, Tick) and phase is Phase.BACKOFF and state.retry_at_s is not None and now_s >= state.retry_at_s:
        return replace(state, phase=Phase.SCANNING, retry_at_s=None), [StartScan(policy.scan_timeout_s)]

    return state, []
