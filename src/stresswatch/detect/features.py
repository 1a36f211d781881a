"""Vectorised window features for many users and windows at once (no loop per window).

Three steps, all pure array code:

1. :func:`prepare_beats` runs when samples *arrive* (rows sorted by user, then time): it
   cleans RR and computes each kept beat's successive difference, carrying each user's last
   beat across batches in :class:`BeatCarry`. Per-beat work is therefore done once.
2. :func:`block_partials` runs when a user's *minute* is over: the minute's rows are reduced
   with ``np.add.reduceat`` (cache-sized blocks) into :class:`Partials` (counts and sums).
3. :func:`combine` runs when a *window* is over: its minutes' partials are combined in order
   (SDNN from block moments, Chan et al. 1979).

Minutes are canonical (epoch minutes) and reduced only once complete, with their rows in
time order, so every floating-point sum is bit-identical between streaming in any chunking
and one batch pass. :func:`window_features` runs all three on a samples frame.

Why one module of this size: the three steps share the partial-sum layout (:class:`Partials`)
whose exact summation order is what makes streaming bit-identical to batch; keeping them
together keeps that contract in one place.

Conventions (stated because libraries differ):

* RR cleaning, per window: beats outside ``[rr_min_ms, rr_max_ms]`` are removed, then a beat
  whose RR differs from the previous in-range beat of the same window by more than
  ``rr_max_change`` (relative to that previous beat) is removed (successive-difference rule;
  an ectopic beat and its compensatory pause both go). ``n_rr_removed`` counts both.
* ``rmssd_ms``: root mean square of the successive differences between consecutive *kept*
  beats of the window (a removed beat leaves a gap; the difference across it is used, as
  NeuroKit2 and hrv-analysis do after artefact removal without interpolation).
* ``sdnn_ms``: standard deviation of the kept RR, ddof = 1 (as NeuroKit2 ``hrv_time``).
* ``pnn50``: share of the n-1 successive differences whose absolute value exceeds 50 ms
  (hrv-analysis, pyhrv; NeuroKit2 divides by n instead).
* ``hr_mean``: mean of 60000 / RR over kept beats; from ``hr_bpm`` samples when a window has
  no kept beat (HR-only sources; readings outside the RR range's bpm equivalent are dropped),
  or when its beats cover less than ``min_coverage`` and its readings do (an optical watch's
  gappy beat-to-beat intervals); such windows are ``hr_only``.
* ``coverage``: sum of kept RR divided by the window length (0..1); for HR-only windows the
  share of minutes holding at least one valid HR reading.
* ``signal``: ``rr`` (beat-to-beat features), ``hr_only`` (HR from readings, no HRV) or
  ``none``.
* ``lf_ms2``, ``hf_ms2``, ``lf_hf``: only from :func:`window_features` with ``spectral=True``
  (:mod:`.spectral`, Lomb-Scargle on the kept beats; not computed by the detector).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import polars as pl

from ..config import DetectorSettings
from ..model import Metric
from . import spectral

NS = 1_000_000_000
NO_WINDOW = np.iinfo(np.int64).min
BLOCK_ROWS = 1 << 16  # reduceat over ~64k-row blocks keeps the working set in L2 cache

CODE = {Metric.RR_MS.value: 0, Metric.HR_BPM.value: 1, Metric.STEPS.value: 2, Metric.MOTION.value: 3}

FEATURE_COLUMNS = (
    "n_beats",
    "n_rr_removed",
    "coverage",
    "hr_mean",
    "rmssd_ms",
    "ln_rmssd",
    "sdnn_ms",
    "pnn50",
    "steps",
    "motion",
)
SPECTRAL_COLUMNS = ("lf_ms2", "hf_ms2", "lf_hf")  # window_features(spectral=True)


@dataclass
class BeatCarry:
    """Per user: the last in-range beat and the last kept beat (RR ms, window key)."""

    ir_rr: np.ndarray
    ir_key: np.ndarray
    kept_rr: np.ndarray
    kept_key: np.ndarray

    @classmethod
    def empty(cls, users: int = 0) -> BeatCarry:
        return cls(np.zeros(users), np.full(users, NO_WINDOW), np.zeros(users), np.full(users, NO_WINDOW))

    def grow(self, users: int) -> None:
        extra = users - len(self.ir_rr)
        if extra > 0:
            fresh = BeatCarry.empty(extra)
            for f in fields(self):
                setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(fresh, f.name)]))


@dataclass
class Beats:
    """Prepared RR rows: window key (user, window), RR, kept?, successive difference (0 if none), has diff?"""

    key: np.ndarray
    rr: np.ndarray
    kept: np.ndarray
    d: np.ndarray
    has_d: np.ndarray

    def take(self, idx: np.ndarray | slice) -> Beats:
        return Beats(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def concat(parts: list[Beats]) -> Beats:
        if len(parts) == 1:
            return parts[0]
        return Beats(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Beats)))

    @staticmethod
    def empty() -> Beats:
        return Beats(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool), np.zeros(0), np.zeros(0, bool))


@dataclass
class Others:
    """Non-RR rows: block key (user << 32 | epoch minute), metric code, value."""

    key: np.ndarray
    code: np.ndarray
    value: np.ndarray

    def take(self, idx: np.ndarray | slice) -> Others:
        return Others(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def concat(parts: list[Others]) -> Others:
        if len(parts) == 1:
            return parts[0]
        return Others(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Others)))

    @staticmethod
    def empty() -> Others:
        return Others(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0))


def _prev_in_window(key: np.ndarray, r: np.ndarray, carry_r: np.ndarray, carry_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by key: does the previous row (or the user's carried row) share the
    window, and its value. Updates the carry with each user's last row."""
    n = len(key)
    same = np.empty(n, bool)
    prev = np.empty(n)
    same[0] = False
    np.equal(key[1:], key[:-1], out=same[1:])
    prev[0] = 0.0
    prev[1:] = r[:-1]
    seg = np.flatnonzero(~same)  # first row of each window
    users = key[seg] >> 32
    ustart = seg[np.concatenate(([True], users[1:] != users[:-1]))]
    uid = key[ustart] >> 32
    same[ustart] = carry_k[uid] == key[ustart]
    prev[ustart] = carry_r[uid]
    uend = np.append(ustart[1:] - 1, n - 1)
    carry_k[uid] = key[uend]
    carry_r[uid] = r[uend]
    return same, prev


def clean_rr(seg: np.ndarray, rr_ms: np.ndarray, settings: DetectorSettings) -> np.ndarray:
    """Boolean mask of beats kept, for RR sorted by time within segments ``seg`` (one window each)."""
    return prepare_beats(np.asarray(seg, np.int64), np.asarray(rr_ms, np.float64), BeatCarry.empty(1), settings).kept


PREPARE_BLOCK = 1 << 15  # rows per block: temporaries stay in cache and in the allocator's heap


def prepare_beats(
    key: np.ndarray, rr: np.ndarray, carry: BeatCarry, s: DetectorSettings, block_key: np.ndarray | None = None
) -> Beats:
    """Clean RR and compute successive differences; rows sorted by window ``key``, then time.

    ``carry`` (indexed by user) holds each user's beats from earlier batches and is updated;
    it also carries the state from one block of rows to the next. The returned rows are keyed
    by ``block_key`` (the minute block) when given.
    """
    rr = np.asarray(rr, np.float64)
    n = len(rr)
    if n <= PREPARE_BLOCK:
        b = _prepare_block(key, rr, carry, s)
    else:
        kept = np.empty(n, bool)
        d = np.empty(n)
        has_d = np.empty(n, bool)
        for lo in range(0, n, PREPARE_BLOCK):
            hi = min(lo + PREPARE_BLOCK, n)
            part = _prepare_block(key[lo:hi], rr[lo:hi], carry, s)
            kept[lo:hi] = part.kept
            d[lo:hi] = part.d
            has_d[lo:hi] = part.has_d
        b = Beats(key, rr, kept, d, has_d)
    if block_key is not None:
        b.key = block_key
    return b


def _prepare_block(key: np.ndarray, rr: np.ndarray, carry: BeatCarry, s: DetectorSettings) -> Beats:
    n = len(rr)
    if n == 0:
        return Beats.empty()
    in_range = (rr >= s.rr_min_ms) & (rr <= s.rr_max_ms)
    all_in = bool(in_range.all())
    # boolean-mask gathers and scatters: cheaper than index arrays when few rows drop out
    if all_in:
        ki_, ri = key, rr
    else:
        ki_, ri = key[in_range], rr[in_range]
    if len(ri):
        same, prev = _prev_in_window(ki_, ri, carry.ir_rr, carry.ir_key)
        jump = same & (np.abs(ri - prev) > s.rr_max_change * prev)
        if all_in:
            kept = ~jump
        else:
            kept = in_range.copy()
            kept[in_range] = ~jump
    else:
        kept = in_range
    if kept.all():
        same, prev = _prev_in_window(key, rr, carry.kept_rr, carry.kept_key)
        d = np.where(same, rr - prev, 0.0)
        return Beats(key, rr, kept, d, same)
    d = np.zeros(n)
    has_d = np.zeros(n, bool)
    kk, rk = key[kept], rr[kept]
    if len(kk):
        same, prev = _prev_in_window(kk, rk, carry.kept_rr, carry.kept_key)
        d[kept] = np.where(same, rk - prev, 0.0)
        has_d[kept] = same
    return Beats(key, rr, kept, d, has_d)


def _segments(key: np.ndarray) -> np.ndarray:
    """Start row of each run of equal keys (``key`` sorted)."""
    if len(key) == 0:
        return np.zeros(0, np.int64)
    change = np.empty(len(key), bool)
    change[0] = True
    np.not_equal(key[1:], key[:-1], out=change[1:])
    return np.flatnonzero(change)


def _blocks(starts: np.ndarray, n: int) -> list[tuple[int, int, int, int]]:
    """Split segments into runs of about BLOCK_ROWS rows: (first seg, end seg, first row, end row)."""
    out = []
    nseg = len(starts)
    s0 = 0
    while s0 < nseg:
        target = starts[s0] + BLOCK_ROWS
        s1 = int(np.searchsorted(starts, target, side="right"))
        s1 = max(s1, s0 + 1)
        r1 = int(starts[s1]) if s1 < nseg else n
        out.append((s0, s1, int(starts[s0]), r1))
        s0 = s1
    return out


@dataclass
class Partials:
    """Per (user, minute block): the sums a window's features are combined from.

    Blocks are canonical (epoch minutes), and a block is reduced only once all its rows are
    in, so these are identical whatever the chunking of the input; combining the blocks of a
    window in minute order is then identical too. A window close combines at most
    ``window_s / 60`` rows per user instead of re-reading every beat.
    """

    key: np.ndarray  # user << 32 | epoch minute
    n_raw: np.ndarray
    n_kept: np.ndarray
    sum_rr: np.ndarray
    sum_inv: np.ndarray
    m2: np.ndarray  # sum of squared deviations of kept RR from the block's own mean
    n_d: np.ndarray
    ss_d: np.ndarray
    n_big: np.ndarray
    n_hr: np.ndarray
    sum_hr: np.ndarray
    steps: np.ndarray
    motion_sum: np.ndarray
    n_motion: np.ndarray

    def take(self, idx: np.ndarray | slice) -> Partials:
        return Partials(*(getattr(self, f.name)[idx] for f in fields(self)))

    @staticmethod
    def concat(parts: list[Partials]) -> Partials:
        if len(parts) == 1:
            return parts[0]
        return Partials(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Partials)))

    @staticmethod
    def empty() -> Partials:
        i, f = np.zeros(0, np.int64), np.zeros(0)
        return Partials(i, i, i, f, f, f, i, f, i, i, f, f, f, i)


def rr_stats(b: Beats, starts: np.ndarray) -> dict[str, np.ndarray]:
    """Per segment of beats (rows ``starts[i]`` up to the next start): counts and sums."""
    n = len(b.rr)
    nseg = len(starts)
    n_raw = np.diff(np.append(starts, n)).astype(np.int64)
    n_kept = np.empty(nseg, np.int64)
    sum_rr = np.empty(nseg)
    sum_inv = np.empty(nseg)
    m2 = np.empty(nseg)
    n_d = np.empty(nseg, np.int64)
    ss_d = np.empty(nseg)
    n_big = np.empty(nseg, np.int64)
    for s0, s1, r0, r1 in _blocks(starts, n):
        st = starts[s0:s1] - r0
        rr = b.rr[r0:r1]
        kept = b.kept[r0:r1]
        d = b.d[r0:r1]
        lengths = np.diff(np.append(st, r1 - r0))
        if kept.all():  # the common case: no masking passes
            nk = lengths.astype(np.int64)
            srr = np.add.reduceat(rr, st)
            inv = 60000.0 / rr
            dev = rr - np.repeat(srr / nk, lengths)
        else:
            nk = np.add.reduceat(kept.view(np.int8), st, dtype=np.int64)
            srr = np.add.reduceat(np.where(kept, rr, 0.0), st)
            inv = np.divide(60000.0, rr)
            inv *= kept
            mean = srr / np.maximum(nk, 1)  # finite: a block without kept beats adds nothing
            dev = rr - np.repeat(mean, lengths)
            dev *= kept
        n_kept[s0:s1] = nk
        sum_rr[s0:s1] = srr
        sum_inv[s0:s1] = np.add.reduceat(inv, st)
        m2[s0:s1] = np.add.reduceat(dev * dev, st)
        n_d[s0:s1] = np.add.reduceat(b.has_d[r0:r1].view(np.int8), st, dtype=np.int64)
        ss_d[s0:s1] = np.add.reduceat(d * d, st)
        n_big[s0:s1] = np.add.reduceat((np.abs(d) > 50.0).view(np.int8), st, dtype=np.int64)
    return {"n_raw": n_raw, "n_kept": n_kept, "sum_rr": sum_rr, "sum_inv": sum_inv, "m2": m2, "n_d": n_d, "ss_d": ss_d, "n_big": n_big}


def other_stats(o: Others, starts: np.ndarray, s: DetectorSettings) -> dict[str, np.ndarray]:
    """Per segment of non-RR rows: valid HR readings (count, sum), steps, motion (sum, count)."""
    if len(o.value) == 0:
        i, f = np.zeros(0, np.int64), np.zeros(0)
        return {"n_hr": i, "sum_hr": f, "steps": f, "motion_sum": f, "n_motion": i}
    hr_lo, hr_hi = 60000.0 / s.rr_max_ms, 60000.0 / s.rr_min_ms
    v = o.value
    is_hr = (o.code == 1) & (v >= hr_lo) & (v <= hr_hi)
    is_motion = o.code == 3
    return {
        "n_hr": np.add.reduceat(is_hr.view(np.int8), starts, dtype=np.int64),
        "sum_hr": np.add.reduceat(np.where(is_hr, v, 0.0), starts),
        "steps": np.add.reduceat(np.where(o.code == 2, v, 0.0), starts),
        "motion_sum": np.add.reduceat(np.where(is_motion, v, 0.0), starts),
        "n_motion": np.add.reduceat(is_motion.view(np.int8), starts, dtype=np.int64),
    }


def merge_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted unique key arrays (no work when one is empty: RR-only data)."""
    if len(b) == 0:
        return a
    if len(a) == 0:
        return b
    return np.union1d(a, b)


def window_key(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One int64 per (user, window or minute index), ordered as (user, index)."""
    return (u.astype(np.int64) << 32) | (w.astype(np.int64) & 0xFFFFFFFF)


def block_partials(beats: Beats, others: Others, s: DetectorSettings) -> Partials:
    """Reduce finished rows per minute block; each row set sorted by block key, time order
    kept inside a block. Returns partials sorted by block key."""
    kb, ko = beats.key, others.key
    sb, so = _segments(kb), _segments(ko)
    rs = rr_stats(beats, sb)
    os_ = other_stats(others, so, s)
    keys = merge_keys(kb[sb], ko[so])
    nb = len(keys)
    ib = np.searchsorted(keys, kb[sb])
    io = np.searchsorted(keys, ko[so])

    def place(vals: np.ndarray, at: np.ndarray) -> np.ndarray:
        out = np.zeros(nb, vals.dtype)
        out[at] = vals
        return out

    return Partials(
        keys,
        *(place(rs[k], ib) for k in ("n_raw", "n_kept", "sum_rr", "sum_inv", "m2", "n_d", "ss_d", "n_big")),
        *(place(os_[k], io) for k in ("n_hr", "sum_hr", "steps", "motion_sum", "n_motion")),
    )


def combine(p: Partials, s: DetectorSettings, group: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Window features from block partials sorted by block key; arrays aligned on windows
    sorted by (user, window). SDNN combines block moments (Chan et al. 1979).

    ``group`` (sorted, one per row) names the window each row belongs to when the windows
    are not the aligned ones: the detector's trailing windows ending at every minute, whose
    rows are gathered minutes (key ``user << 32 | last minute``, returned as ``w``)."""
    per = s.window_s // 60
    u = p.key >> 32
    minute = p.key & 0xFFFFFFFF
    wkey = window_key(u, minute // per) if group is None else group
    st = _segments(wkey)
    nwin = len(st)
    if nwin == 0:
        keys = np.zeros(0, np.int64)
    else:
        keys = wkey[st]

    def red(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, st) if nwin else np.zeros(0, x.dtype)

    n_raw, n_kept, n_d, n_big, n_hr = red(p.n_raw), red(p.n_kept), red(p.n_d), red(p.n_big), red(p.n_hr)
    sum_rr, sum_inv, ss_d = red(p.sum_rr), red(p.sum_inv), red(p.ss_d)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sum_rr / n_kept
        mean_b = p.sum_rr / p.n_kept
        between = np.where(p.n_kept > 0, p.n_kept * (mean_b - np.repeat(mean, np.diff(np.append(st, len(p.key))))) ** 2, 0.0)
        m2 = red(p.m2 + between)
        hr_rr = sum_inv / n_kept
        sdnn = np.sqrt(m2 / (n_kept - 1))
        rmssd = np.sqrt(ss_d / n_d)
        pnn50 = n_big / n_d
        ln_rmssd = np.log(rmssd)
        hr_samples = red(p.sum_hr) / n_hr
        motion = red(p.motion_sum) / red(p.n_motion)
    hr_rr[n_kept < 1] = np.nan
    sdnn[n_kept < 2] = np.nan
    rmssd[n_d < 1] = np.nan
    pnn50[n_d < 1] = np.nan
    ln_rmssd[~np.isfinite(ln_rmssd)] = np.nan
    hr_minutes = red((p.n_hr > 0).astype(np.int64))
    rr_cov = np.minimum(sum_rr / (s.window_s * 1000.0), 1.0)
    hr_cov = np.clip(hr_minutes / per, 0.0, 1.0)
    readings = (n_hr >= s.min_hr_samples) & (hr_cov >= s.min_coverage)
    # Beats decide while they cover the window; an optical watch's gappy beat-to-beat
    # intervals give way to its own HR readings when those cover it and the beats do not.
    has_rr = (n_kept > 0) & ~(readings & (rr_cov < s.min_coverage))
    hr_ok = ~has_rr & (n_hr >= s.min_hr_samples)
    hr = np.where(has_rr, hr_rr, np.where(hr_ok, hr_samples, np.nan))
    coverage = np.where(has_rr, rr_cov, hr_cov)
    # Shape inside the window, from its minutes: the busiest minute's steps, the highest and
    # lowest minute's HR (a climb of stairs is a minute, a 5-minute mean hides it; the span
    # says how steep a change is).
    with np.errstate(invalid="ignore", divide="ignore"):
        minute_hr = np.where(p.n_kept > 0, p.sum_inv / p.n_kept, np.where(p.n_hr > 0, p.sum_hr / p.n_hr, -np.inf))
    hr_peak = np.maximum.reduceat(minute_hr, st) if nwin else np.zeros(0)
    hr_peak[~np.isfinite(hr_peak)] = np.nan
    hr_low = np.minimum.reduceat(np.where(np.isfinite(minute_hr), minute_hr, np.inf), st) if nwin else np.zeros(0)
    hr_low[~np.isfinite(hr_low)] = np.nan
    steps_peak = np.maximum.reduceat(p.steps, st) if nwin else np.zeros(0)
    return {
        "hr_peak_minute": hr_peak,
        "hr_low_minute": hr_low,
        "steps_peak_minute": steps_peak,
        "key": keys,
        "u": keys >> 32,
        "w": keys & 0xFFFFFFFF,
        "n_beats": n_kept,
        "n_rr_removed": n_raw - n_kept,
        "coverage": coverage,
        "hr_mean": hr,
        "rmssd_ms": rmssd,
        "ln_rmssd": ln_rmssd,
        "sdnn_ms": sdnn,
        "pnn50": pnn50,
        "steps": red(p.steps),
        "motion": motion,
        "signal": np.where(has_rr, 0, np.where(hr_ok, 1, 2)).astype(np.int8),
    }


def aggregate(beats: Beats, others: Others, s: DetectorSettings) -> dict[str, np.ndarray]:
    """Window features of finished rows (block-keyed, sorted): blocks, then windows."""
    return combine(block_partials(beats, others, s), s)


SIGNALS = np.array(["rr", "hr_only", "none"])
_SIGNAL_NAMES = pl.Series("signal", SIGNALS.tolist(), pl.String)


SMALL_COLUMN = 4096  # rows coded by a dict lookup each (cheaper than a polars call)


def encode_users(col: pl.Series, known: dict[str, int], *, grow: bool = True) -> np.ndarray:
    """Integer code of each row's string in ``known``; new strings are appended to it
    (``grow``) or raise ``KeyError``. Runs of one value (per-user files, live batches) are
    coded once per run, so sorted input costs little more than a scan."""
    if col.len() >= 16:
        starts = col.ne_missing(col.shift(1)).arg_true().to_numpy()  # first row of each run
        if len(starts) * 4 <= col.len():
            lens = np.diff(np.append(starts, col.len()))
            return np.repeat(encode_users(col.gather(starts), known, grow=grow), lens)
    uniq = col.unique(maintain_order=True).to_list()
    for name in uniq:  # codes ascend in row order: no sort later
        if name not in known:
            if not grow:
                raise KeyError(name)
            known[name] = len(known)
    # Look up only the names present: a cast to an Enum of every known name cost O(known)
    # per call (0.12 s per engine flush at 100,000 users).
    if col.len() <= SMALL_COLUMN:
        return np.fromiter((known[x] for x in col.to_list()), np.int64, col.len())
    return col.replace_strict(uniq, [known[x] for x in uniq], return_dtype=pl.Int64).to_numpy()


def stable_user_order(u: np.ndarray) -> np.ndarray:
    """Indices that sort rows by user code, keeping the order of each user's rows."""
    u = np.asarray(u, np.int64)
    if len(u) and int(u.max()) < 65536:
        return np.argsort(u.astype(np.uint16), kind="stable")  # numpy: radix sort, O(n)
    return np.argsort(u, kind="stable")


def merge_order(users: list[np.ndarray]) -> np.ndarray:
    """Order of the concatenation of pieces, each sorted by user, that sorts it by user and
    keeps earlier pieces first within a user (a stable k-way merge). Small pieces are
    inserted by binary search in O(n); comparable sizes fall back to a stable sort."""
    total = sum(len(x) for x in users)
    big = max(len(x) for x in users)
    if total - big > total // 4:
        return stable_user_order(np.concatenate(users))
    order = np.arange(len(users[0]), dtype=np.int64)
    merged = np.asarray(users[0], np.int64)
    offset = len(merged)
    for b in users[1:]:
        m, n = len(b), len(merged)
        if m == 0:
            continue
        pos = np.searchsorted(merged, b, side="right") + np.arange(m)
        rest = np.ones(n + m, bool)
        rest[pos] = False
        new_order = np.empty(n + m, np.int64)
        new_order[rest] = order
        new_order[pos] = offset + np.arange(m)
        new_merged = np.empty(n + m, np.int64)
        new_merged[rest] = merged
        new_merged[pos] = b
        order, merged = new_order, new_merged
        offset += m
    return order


@dataclass
class Columns:
    """A samples batch as arrays sorted by (user, time): window key, block key, time ns, metric code, value."""

    key: np.ndarray
    block: np.ndarray
    t: np.ndarray
    code: np.ndarray
    value: np.ndarray

    def take(self, idx: np.ndarray) -> Columns:
        return Columns(*(getattr(self, f.name)[idx] for f in fields(self)))


def to_columns(samples: pl.DataFrame, u: np.ndarray, s: DetectorSettings) -> Columns:
    """Arrays of ``samples`` sorted by (user code ``u``, time)."""
    t = samples.get_column("time").to_physical().to_numpy()
    metric = samples.get_column("metric")
    if metric.len() and bool((metric == metric[0]).all()):  # one metric (RR files): no hashing per row
        code = np.full(metric.len(), CODE[metric[0]], np.int8)
    else:
        code = encode_users(metric, dict(CODE), grow=False).astype(np.int8)
    value = samples.get_column("value").to_numpy()
    n = len(t)
    if n > 1 and not bool(np.all(u[1:] >= u[:-1])):
        # Stable sort by user keeps each user's time order (radix sort: O(n)).
        order = stable_user_order(u)
        u, t, code, value = u[order], t[order], code[order], value[order]
    if n > 1:
        bi = np.flatnonzero(t[1:] < t[:-1])  # time goes back: fine only where the user changes
        if len(bi) and bool(np.any(u[bi] == u[bi + 1])):
            order = np.lexsort((t, u))
            u, t, code, value = u[order], t[order], code[order], value[order]
    minute = t // (60 * NS)
    ub = u << 32 if u.dtype == np.int64 else u.astype(np.int64) << 32
    return Columns(ub | (minute // (s.window_s // 60)), ub | minute, t, code, value)


def split_rows(c: Columns, carry: BeatCarry, s: DetectorSettings) -> tuple[Beats, Others]:
    """Prepared RR rows and other rows of sorted columns, keyed by minute block."""
    is_rr = c.code == 0
    if is_rr.all():
        return prepare_beats(c.key, c.value, carry, s, c.block), Others.empty()
    ri = np.flatnonzero(is_rr)
    oi = np.flatnonzero(~is_rr)
    beats = prepare_beats(c.key[ri], c.value[ri], carry, s, c.block[ri])
    return beats, Others(c.block[oi], c.code[oi], c.value[oi])


def window_features(samples: pl.DataFrame, settings: DetectorSettings, *, spectral: bool = False) -> pl.DataFrame:
    """One row per (user, window_start) present in ``samples``, sorted by user then time.

    Windows are aligned to multiples of ``window_s`` since the Unix epoch (UTC), so any
    chunking of the input lands beats in the same windows. ``spectral`` adds ``lf_ms2``,
    ``hf_ms2`` and ``lf_hf`` (``spectral.hrv_frequency`` on the kept beats of ``rr`` windows;
    about 20x the cost of all other features together, so not computed unless asked).
    """
    known: dict[str, int] = {}
    u = encode_users(samples.get_column("user"), known)
    cols = to_columns(samples, u, settings)
    beats, others = split_rows(cols, BeatCarry.empty(len(known)), settings)
    f = aggregate(beats, others, settings)
    if spectral:
        f.update(_spectral_columns(cols, beats, f, settings))
    frame = features_frame(f, pl.Series("user", list(known), pl.String), settings)
    return frame.sort("user", "window_start")


def _spectral_columns(c: Columns, beats: Beats, f: dict[str, np.ndarray], s: DetectorSettings) -> dict[str, np.ndarray]:
    """LF, HF, LF/HF of each ``rr`` window of ``f`` from its kept beats (NaN elsewhere)."""
    is_rr = c.code == 0
    wkey = c.key[is_rr][beats.kept]
    t_ns = c.t[is_rr][beats.kept]
    st = _segments(wkey)
    w_ns = (wkey[st] & 0xFFFFFFFF) * (s.window_s * NS)
    # seconds from the window's start, exact in integers before the conversion to float
    t_s = (t_ns - np.repeat(w_ns, np.diff(np.append(st, len(wkey))))) / NS
    spec = spectral.hrv_frequency(t_s, beats.rr[beats.kept], st, s.window_s)
    at = np.searchsorted(f["key"], wkey[st])
    is_rr_window = f["signal"] == 0
    out = {}
    for name in SPECTRAL_COLUMNS:
        col = np.full(len(f["key"]), np.nan)
        col[at] = spec[name]
        out[name] = np.where(is_rr_window, col, np.nan)
    return out


def features_frame(f: dict[str, np.ndarray], names: pl.Series, s: DetectorSettings) -> pl.DataFrame:
    w_ns = s.window_s * NS
    floats = [*FEATURE_COLUMNS[2:], *(c for c in SPECTRAL_COLUMNS if c in f)]
    return pl.DataFrame(
        [
            names.gather(f["u"]).alias("user"),
            pl.Series("window_start", f["w"] * w_ns).cast(pl.Datetime("ns", "UTC")),
            pl.Series("window_end", (f["w"] + 1) * w_ns).cast(pl.Datetime("ns", "UTC")),
            *(pl.Series(c, f[c]) for c in ("n_beats", "n_rr_removed")),
            *(pl.Series(c, f[c], pl.Float64) for c in FEATURE_COLUMNS[2:]),
            _SIGNAL_NAMES.gather(f["signal"]),
            *(pl.Series(c, f[c], pl.Float64) for c in SPECTRAL_COLUMNS if c in f),
        ]
    ).with_columns(pl.col(floats).fill_nan(None))
