"""Per-beat timestamps from RR intervals and notification arrival times, without drift.

A notification lists the RR intervals of the beats since the previous one (oldest first)
and arrives some latency after its last beat (connection interval, radio retries: 7.5 ms to
a few hundred ms, varying). Two naive methods fail:

* summing RR from the first arrival accumulates the sensor's clock error (±50-500 ppm:
  up to 1.8 s per hour) and every dropped interval shifts all later beats;
* anchoring each notification's last beat at its arrival copies the radio jitter into the
  intervals between notifications (RR read back from the timestamps is then wrong).

Method here (a *beat chain* with a lower-envelope offset):

1. Within a chain, beat ``i`` is at ``offset + C_i`` where ``C_i`` is the exact sum of the
   chain's RR intervals, kept as an integer count of 1/1024 s (no rounding ever accumulates;
   ns = count * 10^9 // 1024).
2. A beat cannot be reported before it happened, so for each notification
   ``offset <= arrival - C_last``. The offset follows the *lower envelope* of
   ``arrival - C_last``: it drops at once when a notification would put a beat after its
   own arrival, and rises at most :attr:`BeatClockConfig.slew_ppm` (default 500 ppm) of the
   elapsed time otherwise. Sensor-clock drift is therefore absorbed continuously, and the
   error of any beat stays within the smallest recent latency plus the slew, however long
   the session (tested over an hour of real RR with a 300 ppm clock error and random latency).
3. A chain breaks (a new one starts, its last beat anchored at the arrival) when the
   residual exceeds :attr:`BeatClockConfig.break_s` (beats the sensor never reported), after
   a notification without skin contact, or after a disconnect (:func:`reset`). Intervals
   between beats of one notification are always exactly their RR values; timestamps are
   strictly increasing.

The state is a frozen dataclass and :func:`place_beats` a pure function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class BeatClockConfig:
    slew_ppm: float = 500.0  # crystal clocks are within ±50 ppm; phones' BLE stacks add more
    break_s: float = 2.0  # residual above this: beats were lost, start a new chain


@dataclass(frozen=True)
class BeatClock:
    active: bool = False
    offset_ns: int = 0  # estimated wall-clock time of the chain's origin
    chain_1024: int = 0  # exact sum of the chain's RR intervals in 1/1024 s
    last_arrival_ns: int = 0
    last_beat_ns: int | None = None
    chains: int = 0  # how many chains were started (diagnostics and tests)


def _ns(units_1024: int) -> int:
    return units_1024 * NS_PER_S // 1024


def reset(clock: BeatClock) -> BeatClock:
    """After a disconnect: the next notification starts a new chain (timestamps stay monotonic)."""
    return replace(clock, active=False)


def place_beats(
    clock: BeatClock,
    arrival_ns: int,
    rr_1024: Sequence[int],
    config: BeatClockConfig = BeatClockConfig(),
) -> tuple[BeatClock, list[int]]:
    """Timestamps (ns) of the beats ending each RR interval of one notification.

    Every interval counts as elapsed sensor time, also one the parser marked implausible
    (the caller emits no sample for it, but the sensor did measure that much time between
    two detections). A notification without sensor contact is not passed here: the caller
    calls :func:`reset` instead, because its intervals are noise.
    """
    if not rr_1024:
        return replace(clock, last_arrival_ns=arrival_ns) if clock.active else clock, []
    total = sum(int(v) for v in rr_1024)
    chains = clock.chains
    if not clock.active:
        offset, chain = arrival_ns - _ns(total), 0
        chains += 1
    else:
        offset, chain = clock.offset_ns, clock.chain_1024
        candidate = arrival_ns - _ns(chain + total)
        residual = candidate - offset
        if residual < 0:
            offset = candidate  # the last beat would be after its own arrival: impossible
        elif residual > config.break_s * NS_PER_S:
            offset, chain = arrival_ns - _ns(total), 0  # beats were lost: start a new chain
            chains += 1
        else:
            dt = max(arrival_ns - clock.last_arrival_ns, 0)
            offset += min(residual, int(dt * config.slew_ppm * 1e-6))
    last_beat = clock.last_beat_ns
    out: list[int] = []
    c = chain
    for units in rr_1024:
        c += int(units)
        t = offset + _ns(c)
        if last_beat is not None and t <= last_beat:
            t = last_beat + 1  # after a downward correction: keep beats strictly ordered
        out.append(t)
        last_beat = t
    return (
        BeatClock(
            active=True, offset_ns=offset, chain_1024=c, last_arrival_ns=arrival_ns, last_beat_ns=last_beat, chains=chains
        ),
        out,
    )
