"""Personal baselines: robust (median / MAD) per user and time-of-day slot, bounded memory.

State is struct-of-arrays over users so one call serves many users at once. Per user and
slot a ring of the last ``capacity`` clean windows holds HR and ln RMSSD as float16 (HR
resolution 0.03-0.06 bpm, ln RMSSD 0.002-0.004: far below the scale floors), so memory per
user is ``slots * capacity * 2 features * 2 B`` plus small counters and cached statistics:
3,456 B + 176 B at the defaults (4 slots x 216 windows), whatever the history length.

The median and 1.4826 x MAD of a user's slots are recomputed (where they learned) at the
first window of each refresh period (``baseline_refresh_s``, default 1 h) and cached in between; a slot is
calibrating until it holds ``baseline_min_windows``. Each user's periods are offset by a
phase (CRC-32 of the user id) so 100,000 users do not all recompute in the same tick. All of
this depends only on each user's own sequence of windows, so streaming and batch agree exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import numpy as np

MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation
STATS = 5  # per slot: HR median and scale, ln RMSSD median and scale, their correlation
RHO_RANGE = (-0.8, 0.0)  # within a person HR and ln RMSSD move against each other; above 0 is estimation noise


def row_bytes(a: np.ndarray) -> int:
    """Bytes one user occupies in a per-user array (first axis = user), even with no users."""
    return int(a.itemsize * np.prod(a.shape[1:], dtype=np.int64))


def user_phase(name: str, periods: int) -> int:
    """A stable per-user offset in 0..periods-1 (independent of arrival order)."""
    return zlib.crc32(name.encode("utf-8")) % periods


@dataclass
class Baselines:
    hr: np.ndarray  # (users, slots, capacity) float16, NaN where empty
    ln_rmssd: np.ndarray
    pushed: np.ndarray  # (users, slots) int32: windows ever learned (ring head = pushed % capacity)
    stats: np.ndarray  # (users, slots, 5) float32: hr median, hr scale, ln median, ln scale, correlation; NaN until ready
    stamp: np.ndarray  # (users,) int64: refresh period of the cached stats
    seen: np.ndarray  # (users, slots) int32: `pushed` when the stats were computed
    phase: np.ndarray  # (users,) int16: the user's refresh periods start this many windows late

    @classmethod
    def empty(cls, slots: int, capacity: int, users: int = 0) -> Baselines:
        return cls(
            np.full((users, slots, capacity), np.nan, np.float16),
            np.full((users, slots, capacity), np.nan, np.float16),
            np.zeros((users, slots), np.int32),
            np.full((users, slots, STATS), np.nan, np.float32),
            np.full(users, np.iinfo(np.int64).min, np.int64),
            np.zeros((users, slots), np.int32),
            np.zeros(users, np.int16),
        )

    @property
    def capacity(self) -> int:
        return self.hr.shape[2]

    def grow(self, users: int, phases: list[int]) -> None:
        extra = users - len(self.phase)
        if extra <= 0:
            return
        fresh = Baselines.empty(self.hr.shape[1], self.capacity, extra)
        fresh.phase[:] = phases
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(fresh, f.name)]))

    def bytes_per_user(self) -> int:
        return sum(row_bytes(getattr(self, f.name)) for f in fields(self))


    def refresh(self, u: np.ndarray, period: np.ndarray, *, min_windows: int, hr_floor: float, ln_floor: float) -> None:
        """At the first window of a user's new refresh period, recompute the statistics of
        every slot that learned since the last time (rows sorted by user then time). All
        slots at once, so a neighbouring slot's statistics are also fixed for the period."""
        due = self.stamp[u] != period
        if not due.any():
            return
        u, period = u[due], period[due]
        first = np.ones(len(u), bool)
        first[1:] = u[1:] != u[:-1]
        u, period = u[first], period[first]
        self.stamp[u] = period
        for slot in range(self.hr.shape[1]):
            uc = u[self.pushed[u, slot] != self.seen[u, slot]]
            if len(uc) == 0:
                continue
            self.seen[uc, slot] = self.pushed[uc, slot]
            ready = self.pushed[uc, slot] >= min_windows
            self.stats[uc[~ready], slot] = np.nan
            ur = uc[ready]
            if len(ur) == 0:
                continue
            for j, (ring, floor) in enumerate(((self.hr, hr_floor), (self.ln_rmssd, ln_floor))):
                med, mad = _median_mad(ring[ur, slot].astype(np.float32))
                self.stats[ur, slot, 2 * j] = med
                self.stats[ur, slot, 2 * j + 1] = np.maximum(MAD_TO_SD * mad, floor)
            self.stats[ur, slot, 4] = _correlation(self.hr[ur, slot].astype(np.float64), self.ln_rmssd[ur, slot].astype(np.float64))

    def push(self, u: np.ndarray, slot: np.ndarray, hr: np.ndarray, ln_rmssd: np.ndarray) -> None:
        """Learn windows (rows sorted by user then time); NaN ln RMSSD (HR-only) is stored as NaN."""
        if len(u) == 0:
            return
        nslots = self.hr.shape[1]
        pair = u * nslots + slot
        order = np.argsort(pair, kind="stable")
        p = pair[order]
        first = np.ones(len(p), bool)
        first[1:] = p[1:] != p[:-1]
        starts = np.flatnonzero(first)
        counts = np.diff(np.append(starts, len(p)))
        k = np.arange(len(p)) - np.repeat(starts, counts)
        uo, so = u[order], slot[order]
        base = self.pushed[uo, so]
        self.hr[uo, so, (base + k) % self.capacity] = hr[order]
        self.ln_rmssd[uo, so, (base + k) % self.capacity] = ln_rmssd[order]
        self.pushed[uo[starts], so[starts]] += counts.astype(np.int32)


def _correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation over pairs where both are present, clipped to
    ``RHO_RANGE``; 0 where it cannot be estimated (HR-only rings, fewer than 10 pairs)."""
    ok = ~np.isnan(x) & ~np.isnan(y)
    n = ok.sum(axis=1)
    nn = np.maximum(n, 1)
    xm = np.where(ok, x, 0.0).sum(axis=1) / nn
    ym = np.where(ok, y, 0.0).sum(axis=1) / nn
    dx = np.where(ok, x - xm[:, None], 0.0)
    dy = np.where(ok, y - ym[:, None], 0.0)
    sxy, sxx, syy = (dx * dy).sum(axis=1), (dx * dx).sum(axis=1), (dy * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx * syy)
    r = np.where((n >= 10) & np.isfinite(r), r, 0.0)
    return np.clip(r, *RHO_RANGE)


def _median_mad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise median and MAD ignoring NaN (NaN sorts last); NaN for rows without values."""
    c = np.sum(~np.isnan(x), axis=1)
    rows = np.arange(len(x))
    lo, hi = np.maximum(c - 1, 0) // 2, np.maximum(c, 1) // 2

    def med_of(v: np.ndarray) -> np.ndarray:
        v = np.sort(v, axis=1)
        m = 0.5 * (v[rows, lo].astype(np.float64) + v[rows, np.minimum(hi, v.shape[1] - 1)])
        return np.where(c > 0, m, np.nan)

    med = med_of(x)
    mad = med_of(np.abs(x - med[:, None].astype(np.float32)))
    return med, mad
