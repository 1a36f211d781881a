"""Per-beat timestamps from RR intervals and arrival times: exact spacing, no drift."""

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch_adapters.ble_hrs.timing import NS_PER_S, BeatClock, place_beats, reset

RR_LONG = Path(__file__).resolve().parent.parent / "fixtures" / "ble" / "rr_nsrdb_long.csv"
T0 = 1_772_438_400 * NS_PER_S


def simulate(rr_ms: np.ndarray, ppm: float, seed: int, latency_ms=(15, 150)):
    """A strap whose clock runs ``ppm`` off, notifying 1-2 beats at a time with random latency."""
    rng = np.random.default_rng(seed)
    true_ns = T0 + np.cumsum(rr_ms * 1e6).astype(np.int64)
    units = np.round(rr_ms * 1.024 * (1 + ppm * 1e-6)).astype(int)
    clock, placed, i = BeatClock(), [], 0
    while i < len(rr_ms):
        j = min(i + int(rng.integers(1, 3)), len(rr_ms))
        arrival = int(true_ns[j - 1]) + int(rng.uniform(*latency_ms) * 1e6)
        clock, ts = place_beats(clock, arrival, [int(u) for u in units[i:j]])
        placed += ts
        i = j
    return np.array(placed), true_ns, clock


def test_one_hour_of_real_rr_with_a_drifting_sensor_clock_does_not_drift():
    rr = np.loadtxt(RR_LONG, skiprows=1)
    for ppm in (-300.0, 0.0, 300.0):
        placed, true_ns, clock = simulate(rr, ppm, seed=int(ppm) + 1000)
        err_ms = (placed - true_ns) / 1e6
        # Naive summing from the first arrival would be off by ppm * 3600 s (1.08 s at 300 ppm).
        assert np.abs(err_ms).max() < 200, ppm
        assert np.abs(err_ms[-300:]).max() < 160, ppm  # still bounded at the end of the hour
        assert err_ms.min() > 0  # never before the beat happened (arrival is an upper bound)
        assert clock.chains == 1


def test_beats_of_one_notification_are_spaced_exactly_by_their_rr():
    clock, ts = place_beats(BeatClock(), T0, [1024, 512, 1000])
    assert np.diff(ts).tolist() == [500_000_000, 976_562_500]  # 512/1024 s and 1000/1024 s, exactly
    assert ts[-1] == T0  # the last beat of a new chain is anchored at the arrival


def test_lost_beats_start_a_new_chain_instead_of_shifting_later_beats():
    clock, a = place_beats(BeatClock(), T0, [1024])
    # 10 s later the sensor reports one beat: 9 s of beats were never reported
    clock, b = place_beats(clock, T0 + 10 * NS_PER_S, [1024])
    assert b == [T0 + 10 * NS_PER_S] and clock.chains == 2


def test_reset_after_disconnect_restarts_the_chain_and_keeps_order():
    clock, a = place_beats(BeatClock(), T0, [800, 800])
    clock = reset(clock)
    clock, b = place_beats(clock, T0 + 100, [1024])  # an early arrival right after reconnect
    assert clock.chains == 2 and b[0] > a[-1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * NS_PER_S), st.lists(st.integers(0, 4000), max_size=4)), max_size=40))
def test_timestamps_strictly_increase(notifications):
    clock, t, last = BeatClock(), T0, None
    for dt, rr in notifications:
        t += dt
        clock, ts = place_beats(clock, t, rr)
        assert len(ts) == len(rr)
        for x in ts:
            assert last is None or x > last
            last = x
