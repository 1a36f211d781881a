"""The detector: sample batches in, finished windows and alert decisions out.

A window ``[start, start + window_s)`` is finished for a user once a sample of that user at
or after its end has arrived (or on :meth:`Detector.flush` / :meth:`Detector.advance`).
So feeding the same samples in any chunking, with each user's batches in time order, yields
the same windows and alerts as one batch pass (bit for bit: see ``features``). Samples that
arrive for a minute already reduced are dropped and counted in :attr:`Detector.late_samples`.

Per arriving batch the beats are cleaned and differenced once (``features.prepare_beats``)
and buffered as arrays in arrival chunks; finished minutes are reduced to partial sums, and
every finished minute's trailing window (``window_s`` long, so 5-minute windows with a
1-minute hop) combines its minutes (``features.block_partials`` / ``combine``). Each is
scored against the user's baseline for that time of day; the log-likelihood ratio of a
stress response (``evidence_llr``) feeds a CUSUM per direction (a fifth of a window's
evidence a minute: the windows overlap), and
the episode state machine decides every minute. Trailing windows ending on a window boundary
are the output windows and the only ones the baseline learns. The sequential part loops over
"the k-th baseline refresh period of each user" (an hour by default), vectorised over users
and over the minutes inside the period, so a week of data for any number of users takes
about 170 passes.

Why one module of this size: the detector's state is one struct-of-arrays over users that
``update``, the refresh loop, ``to_bytes``/``from_bytes`` and ``forget`` all index the same
way; split across modules, each would reach into the others' arrays.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, fields, replace
from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np
import polars as pl

from ..clock import is_zone
from ..config import DetectorSettings
from ..errors import ConfigError, StorageError
from ..model import WINDOW_SCHEMA, AlertDecision, AlertLevel, Reason, WindowState, alert_id_for
from . import episodes
from .baseline import Baselines, row_bytes, user_phase
from .episodes import EpisodeState
from .features import (
    NO_WINDOW,
    NS,
    BeatCarry,
    Beats,
    Others,
    Partials,
    block_partials,
    combine,
    encode_users,
    features_frame,
    merge_order,
    split_rows,
    to_columns,
)
from .features import _segments, merge_keys

MINUTE_NS = 60 * NS
LOW32 = 0xFFFFFFFF

STATES = np.array([s.value for s in (WindowState.INSUFFICIENT_DATA, WindowState.CALIBRATING, WindowState.SUPPRESSED_MOTION, WindowState.OK, WindowState.ELEVATED)])
INSUFFICIENT, CALIBRATING, SUPPRESSED, OK, ELEVATED = range(5)
BOTH, HR, HRV = range(3)  # direction of the evidence (alert reasons)


def evidence_score(z_hr: np.ndarray, z_ln: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the largest of three unit-normal statistics of a person's bivariate
    (HR z, ln RMSSD z) model with correlation ``rho``, and which one it was.

    Under the person's calm baseline (z ~ N(0, R), R = [[1, rho], [rho, 1]]) the likelihood
    ratio test for a shift along both signals at once (HR up and HRV down, v = (1, -1)) is
    ``v' R^-1 z / sqrt(v' R^-1 v) = (z_hr - z_ln) / sqrt(2 (1 - rho))``; a shift of one
    signal alone is tested by its own z (``z_hr``, ``-z_ln``). So a large HRV drop or HR
    rise alone can decide, both together decide sooner, and the winning direction becomes
    the alert's reasons. Windows without HRV (HR readings) score ``z_hr``."""
    r = np.where(np.isnan(rho), 0.0, rho)
    both = (z_hr - z_ln) / np.sqrt(2.0 * (1.0 - r))
    hr_alone = z_hr
    hrv_alone = -z_ln
    stack = np.stack([both, hr_alone, hrv_alone])
    has_ln = ~np.isnan(z_ln)
    best = np.argmax(np.where(np.isnan(stack), -np.inf, stack), axis=0).astype(np.int8)
    score = np.where(has_ln, np.max(stack, axis=0, initial=-np.inf, where=~np.isnan(stack)), z_hr)
    return score, np.where(has_ln, best, HR).astype(np.int8)


def evidence_llr(z_hr: np.ndarray, z_ln: np.ndarray, rho: np.ndarray, shift_hr: np.ndarray, shift_ln: np.ndarray) -> np.ndarray:
    """Per window, shape (3, n): the log-likelihood ratio of a stress response against the
    person's calm baseline, for each way it can show (``BOTH``, ``HR``, ``HRV``).

    Calm: z ~ N(0, R), R = [[1, rho], [rho, 1]]. Stress shifts the mean by the person's
    expected response in their own z units: ``shift_hr`` (HR up) and ``shift_ln`` (ln RMSSD
    down). Both together: mu = (a, -b), LLR = mu' R^-1 z - mu' R^-1 mu / 2. One signal
    alone is tested on its own margin (a z_hr - a^2 / 2, -b z_ln - b^2 / 2), not
    conditioned on the other: conditioning divides by 1 - rho^2 and turns an ordinary HRV
    dip of a person with strongly coupled signals into strong evidence (docs/DETECTOR.md).
    Without HRV (HR readings) only the HR row is defined (the others are NaN)."""
    r = np.where(np.isnan(rho), 0.0, rho)
    a, b = shift_hr, shift_ln
    det = 1.0 - r * r
    both = ((a + r * b) * z_hr - (r * a + b) * z_ln) / det - (a * a + 2 * r * a * b + b * b) / (2 * det)
    return np.stack([both, a * z_hr - a * a / 2, -b * z_ln - b * b / 2])


NEVER = np.iinfo(np.int64).min
STATE_FORMAT = 4  # bump when the serialised layout changes


@dataclass(frozen=True)
class DetectorOutput:
    windows: pl.DataFrame  # WINDOW_SCHEMA, sorted by user then window_start
    alerts: list[AlertDecision] = field(default_factory=list)


def _empty_windows() -> pl.DataFrame:
    return pl.DataFrame(schema=WINDOW_SCHEMA)


def _user_firsts(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by key (user << 32 | minute): each user present and its first minute."""
    if len(key) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u = key >> 32
    starts = np.flatnonzero(np.append(True, u[1:] != u[:-1]))
    return u[starts], key[starts] & LOW32


@dataclass
class _Chunk:
    beats: Beats
    others: Others
    min_w: int  # smallest minute index in the chunk (skip it cheaply while nothing can finish)
    # Per user in the chunk, its first minute: a chunk has rows to reduce exactly when some
    # user's limit is past its first minute, so a flush tests ~users, not every buffered row.
    users_b: np.ndarray = field(init=False, repr=False)
    first_b: np.ndarray = field(init=False, repr=False)
    users_o: np.ndarray = field(init=False, repr=False)
    first_o: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.users_b, self.first_b = _user_firsts(self.beats.key)
        self.users_o, self.first_o = _user_firsts(self.others.key)

    def finishes(self, limit_m: np.ndarray) -> bool:
        """Some row's minute is below its user's ``limit_m``."""
        return bool(np.any(limit_m[self.users_b] > self.first_b) or np.any(limit_m[self.users_o] > self.first_o))


@dataclass
class _PChunk:
    partials: Partials  # reduced minutes not yet decided, or still inside a later trailing window
    min_w: int  # unused (kept in the saved layout)
    users: np.ndarray = field(init=False, repr=False)  # the users with rows here, sorted

    def __post_init__(self) -> None:
        self.users = _user_firsts(self.partials.key)[0]


MAX_PCHUNKS = 256  # pieces of reduced minutes before they are merged into one (bounds the per-call scan)


class Detector:
    """Per-user streaming state over many users; arrays, not objects per user."""

    def __init__(self, settings: DetectorSettings | None = None, timezones: Mapping[str, str] | None = None) -> None:
        """``timezones``: IANA zone per user for the time-of-day slots (default UTC); see
        :meth:`set_timezone`."""
        self.settings = s = settings or DetectorSettings()
        self._tz_names: list[str] = ["UTC"]
        self._tz_wanted: dict[str, str] = {}
        self._tz = np.zeros(0, np.int16)
        self._users: dict[str, int] = {}
        self._names = pl.Series("user", [], pl.String)
        self._chunks: list[_Chunk] = []  # prepared rows of minute blocks not yet finished
        self._pchunks: list[_PChunk] = []  # reduced minute blocks of windows not yet finished
        self._watermark_ns = np.zeros(0, np.int64)
        self._decided_m = np.zeros(0, np.int64)  # last minute whose trailing window was decided
        # Not state (not saved): per user, the highest limit its reduced minutes were examined
        # against. Users whose limit has not passed it and who got no new minutes cannot have a
        # trailing window to decide, so a flush looks only at the users in its batches.
        self._scanned_m = np.zeros(0, np.int64)
        self._closed_w = np.zeros(0, np.int64)  # minute blocks with index below this are reduced
        self._motion_until_ns = np.zeros(0, np.int64)
        self._has_motion = np.zeros(0, bool)  # the person's source has reported steps or motion
        # Incremental snapshots (:meth:`chunk_state`): a stable storage slot per user (increasing
        # with the user number, never reused), a dirty bit per user set whenever the detector
        # changes that user's state, and the slots of forgotten users not yet saved without them.
        self._slot = np.zeros(0, np.int64)
        self._next_slot = 0
        self._dirty = np.zeros(0, bool)
        self._vacated: set[int] = set()
        self.carry = BeatCarry.empty()
        self.baselines = Baselines.empty(s.baseline_slots, s.baseline_windows)
        self.episodes = EpisodeState.empty()
        self.late_samples = 0
        for user, tz in (timezones or {}).items():
            self.set_timezone(user, tz)

    # -- users -------------------------------------------------------------------------
    def _grow(self) -> None:
        n, old = len(self._users), len(self._watermark_ns)
        if n == old:
            return
        extra = n - old
        self._watermark_ns = np.concatenate([self._watermark_ns, np.full(extra, NEVER)])
        self._closed_w = np.concatenate([self._closed_w, np.full(extra, NEVER)])
        self._decided_m = np.concatenate([self._decided_m, np.full(extra, NEVER)])
        self._motion_until_ns = np.concatenate([self._motion_until_ns, np.full(extra, NEVER)])
        self._has_motion = np.concatenate([self._has_motion, np.zeros(extra, bool)])
        self._slot = np.concatenate([self._slot, np.arange(self._next_slot, self._next_slot + extra, dtype=np.int64)])
        self._next_slot += extra
        self._dirty = np.concatenate([self._dirty, np.ones(extra, bool)])
        new = list(self._users)[old:]
        zones = [self._tz_names.index(self._tz_wanted.get(x, "UTC")) for x in new]
        self._tz = np.concatenate([self._tz, np.array(zones, np.int16)])
        self._names = pl.Series("user", list(self._users), pl.String)
        self.carry.grow(n)
        periods = self.settings.baseline_refresh_s // self.settings.window_s
        self.baselines.grow(n, [user_phase(x, periods) for x in new])
        self.episodes.grow(n)

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def baseline_ready(self, user: str) -> bool:
        """True once every time-of-day slot of ``user`` has a baseline."""
        i = self._users.get(user)
        return i is not None and bool(np.all(self.baselines.pushed[i] >= self.settings.baseline_min_windows))

    def state_bytes_per_user(self) -> int:
        """Bytes of detector state per user, excluding the open-window sample buffer."""
        per = self.baselines.bytes_per_user()
        per += sum(row_bytes(getattr(self.carry, f.name)) for f in fields(self.carry))
        per += sum(row_bytes(getattr(self.episodes, f.name)) for f in fields(self.episodes))
        return per + sum(row_bytes(a) for a in (self._watermark_ns, self._closed_w, self._decided_m, self._motion_until_ns, self._tz, self._has_motion))

    # -- streaming API -------------------------------------------------------------------
    def update(self, batch: pl.DataFrame) -> DetectorOutput:
        """Add a validated samples batch; return the windows it finished."""
        if batch.height == 0:
            return DetectorOutput(_empty_windows())
        s = self.settings
        u = encode_users(batch.get_column("user"), self._users)
        self._grow()
        cols = to_columns(batch, u, s)
        uk = cols.block >> 32
        # each user's newest sample is the last of its run (rows sorted by user, time)
        ends = np.append(np.flatnonzero(uk[1:] != uk[:-1]), len(uk) - 1)
        np.maximum.at(self._watermark_ns, uk[ends], cols.t[ends])
        self._dirty[uk[ends]] = True
        # a user's earliest row is its first (sorted): only if that one is late can any be
        firsts = np.append(0, ends[:-1] + 1)
        if np.any((cols.block[firsts] & LOW32) < self._closed_w[uk[firsts]]):
            late = (cols.block & LOW32) < self._closed_w[uk]
        else:
            late = np.zeros(1, bool)
        if late.any():
            self.late_samples += int(late.sum())
            cols = cols.take(np.flatnonzero(~late))
        if len(cols.key):
            beats, others = split_rows(cols, self.carry, s)
            self._chunks.append(_Chunk(beats, others, int((cols.block & LOW32).min())))
        # finished: block / window end <= the user's newest sample
        return self._finish(self._watermark_ns // MINUTE_NS)

    def flush(self) -> DetectorOutput:
        """Finish every open window (end of a replay)."""
        big = np.full(len(self._users), np.iinfo(np.int64).max // 2)
        return self._finish(big)

    def advance(self, now_ns: int, grace_s: int = 60) -> DetectorOutput:
        """Finish windows that ended more than ``grace_s`` before ``now_ns`` (live engine tick)."""
        t = int(now_ns) - grace_s * NS
        n = len(self._users)
        return self._finish(np.full(n, t // MINUTE_NS, np.int64))

    # -- internals -----------------------------------------------------------------------
    def _finish(self, limit_m: np.ndarray) -> DetectorOutput:
        """Reduce buffered minute blocks with index < ``limit_m[user]``, then decide the
        trailing windows ending at those minutes (a window is finished with its last minute)."""
        s = self.settings
        new_users = np.zeros(0, np.int64)
        if self._chunks:
            top = int(limit_m.max()) if len(limit_m) else NEVER
            done_b: list[Beats] = []
            done_o: list[Others] = []
            keep: list[_Chunk] = []
            for c in self._chunks:
                if c.min_w >= top or not c.finishes(limit_m):
                    keep.append(c)
                    continue
                fb = (c.beats.key & LOW32) < limit_m[c.beats.key >> 32]
                fo = (c.others.key & LOW32) < limit_m[c.others.key >> 32]
                if fb.all() and fo.all():
                    done_b.append(c.beats)
                    done_o.append(c.others)
                    continue
                done_b.append(c.beats.take(fb))
                done_o.append(c.others.take(fo))
                rest_b, rest_o = c.beats.take(~fb), c.others.take(~fo)
                if len(rest_b.key) or len(rest_o.key):
                    keep.append(_Chunk(rest_b, rest_o, c.min_w))  # a lower bound is enough to skip
            self._chunks = keep
            if done_b:
                p = _reduce_pieces(done_b, done_o, s)
                if len(p.key):
                    np.maximum.at(self._closed_w, p.key >> 32, (p.key & LOW32) + 1)
                    self._dirty[p.key >> 32] = True
                    self._pchunks.append(_PChunk(p, 0))
                    new_users = p.key >> 32
        if not self._pchunks:
            return DetectorOutput(_empty_windows())
        f = self._trailing(limit_m, new_users)
        if f is None:
            return DetectorOutput(_empty_windows())
        return self._decide(f)

    def _trailing(self, limit_m: np.ndarray, new_users: np.ndarray) -> dict[str, np.ndarray] | None:
        """Features of the trailing window (``window_s``) ending at every finished minute
        with data in it, not decided before; keeps the minutes later ones still need.

        A minute ``m`` is decided once, when it is finished (``m < limit_m``), from the
        reduced minutes ``m - per + 1 .. m``; the window ending at a window boundary has
        exactly the aligned window's minutes, so it *is* that window."""
        s = self.settings
        per = s.window_s // 60
        n_users = len(self._decided_m)
        if len(self._scanned_m) < n_users:
            self._scanned_m = np.concatenate([self._scanned_m, np.full(n_users - len(self._scanned_m), NEVER)])
        # Only users whose limit passed what their minutes were examined against, or with
        # new minutes, can have a window to decide (every candidate below the limit of the
        # last examination was decided then; decided minutes only grow). Their rows are taken
        # out of the pieces and examined; everyone else's stay where they are, untouched.
        touched = limit_m > self._scanned_m
        touched[new_users] = True
        np.maximum(self._scanned_m, limit_m, out=self._scanned_m)
        done: list[Partials] = []
        rest: list[_PChunk] = []
        for c in self._pchunks:
            hit = touched[c.users]
            if not hit.any():
                rest.append(c)
            elif hit.all():
                done.append(c.partials)
            else:
                rows = touched[c.partials.key >> 32]
                done.append(c.partials.take(np.flatnonzero(rows)))
                rest.append(_PChunk(c.partials.take(np.flatnonzero(~rows)), 0))
        if not done:
            return None
        p = Partials.concat(done)
        if len(done) > 1:
            p = p.take(merge_order([x.key >> 32 for x in done]))
        key = p.key
        cand = (key[:, None] + np.arange(per, dtype=np.int64)).ravel()
        cu, cm = cand >> 32, cand & LOW32
        cand = np.unique(cand[(cm > self._decided_m[cu]) & (cm < limit_m[cu])])
        if len(cand) == 0:
            self._pchunks = self._pieces(rest, p)
            return None
        lo = np.searchsorted(key, cand - (per - 1), side="left")
        hi = np.searchsorted(key, cand, side="right")
        n = hi - lo
        first = np.cumsum(n) - n
        rows = np.repeat(lo - first, n) + np.arange(int(n.sum()))
        f = combine(p.take(rows), s, np.repeat(cand, n))
        cu = cand >> 32
        np.maximum.at(self._decided_m, cu, cand & LOW32)
        self._dirty[cu] = True  # baselines, episodes and buffered minutes of these users change
        pu = key >> 32
        keep = (key & LOW32) >= self._decided_m[pu] - (per - 2)
        self._pchunks = self._pieces(rest, p.take(np.flatnonzero(keep)))
        return f

    @staticmethod
    def _pieces(rest: list[_PChunk], p: Partials) -> list[_PChunk]:
        """``rest`` then ``p`` (each user's rows stay in minute order across pieces), merged
        into one piece once there are more than :data:`MAX_PCHUNKS`."""
        out = rest + [_PChunk(p, 0)] if len(p.key) else rest
        if len(out) > MAX_PCHUNKS:
            parts = [c.partials for c in out]
            out = [_PChunk(Partials.concat(parts).take(merge_order([x.key >> 32 for x in parts])), 0)]
        return out

    def _decide(self, f: dict[str, np.ndarray]) -> DetectorOutput:
        """Score, movement, evidence and episodes for the trailing windows ``f`` (one per
        user and minute, sorted); the aligned ones are the output windows and the only
        ones the baseline learns from."""
        s = self.settings
        per = s.window_s // 60
        u, mins = f["u"], f["w"]  # sorted by user, then the trailing window's last minute
        w = mins // per  # the aligned window holding that minute
        aligned = mins % per == per - 1
        n = len(u)
        start_ns = (mins - per + 1) * MINUTE_NS
        end_ns = (mins + 1) * MINUTE_NS
        hr, cov = f["hr_mean"], f["coverage"]
        lnr = np.where(f["signal"] == 0, f["ln_rmssd"], np.nan)  # HR-readings windows: HR alone
        local_s = start_ns // NS + self._utc_offsets_s(u, start_ns)
        slot = (local_s % 86400) // (86400 // s.baseline_slots)
        moving = (f["steps_peak_minute"] >= s.motion_steps_per_min) | (f["motion"] >= s.motion_min)
        hr_peak, hr_low = f["hr_peak_minute"], f["hr_low_minute"]
        reports_motion = (f["steps"] > 0) | ~np.isnan(f["motion"])
        insufficient = (cov < s.min_coverage) | np.isnan(hr)
        bl = self.baselines
        # Refresh periods, offset per user; the baseline is constant within one, so each
        # user's k-th period in this call is handled by pass k, vectorised over users.
        period = (w + bl.phase[u]) // (s.baseline_refresh_s // s.window_s)
        new_p = np.ones(n, bool)
        new_p[1:] = (u[1:] != u[:-1]) | (period[1:] != period[:-1])
        first_u = np.ones(n, bool)
        first_u[1:] = u[1:] != u[:-1]
        c = np.cumsum(new_p)
        prank = c - np.repeat(c[first_u], np.diff(np.append(np.flatnonzero(first_u), n)))
        order = np.argsort(prank, kind="stable")  # stays sorted by user, window inside a pass
        bounds = np.searchsorted(prank[order], np.arange(int(prank.max()) + 2))

        out = {k: np.full(n, np.nan) for k in ("hr_baseline", "hr_z", "ln_rmssd_baseline", "ln_rmssd_z", "score")}
        direction = np.zeros(n, np.int8)
        state = np.empty(n, np.int8)
        alert_all = np.zeros(n, bool)
        slot_used = slot.copy()
        ep_start_all = np.zeros(n, np.int64)
        rec_ns = s.motion_recovery_s * NS
        for r in range(len(bounds) - 1):
            rows = order[bounds[r] : bounds[r + 1]]
            ui, si = u[rows], slot[rows]
            bl.refresh(ui, period[rows], min_windows=s.baseline_min_windows, hr_floor=s.hr_scale_floor_bpm, ln_floor=s.ln_rmssd_scale_floor)
            h, ln = hr[rows], lnr[rows]
            t0 = start_ns[rows]
            # where a movement seen in this trailing window ended at the latest: its first
            # minute (the later windows holding the same movement say so themselves)
            mend = t0 + MINUTE_NS
            # Score against the window's own time-of-day baseline and, where a neighbouring
            # slot's HR level differs, that neighbour too, keeping the least alarming: waking up
            # early or going to bed late compares an awake window with a sleeping slot, which is
            # not stress (see docs/DETECTOR.md).
            best = None
            for k, shift in enumerate((0, -1, 1)[: min(3, s.baseline_slots)]):
                sj = (si + shift) % s.baseline_slots
                st4 = bl.stats[ui, sj].astype(np.float64)
                z_h = (h - st4[:, 0]) / st4[:, 1]
                z_l = (ln - st4[:, 2]) / st4[:, 3]
                sc, dirn = evidence_score(z_h, z_l, st4[:, 4])
                if best is None:
                    best = [sc, z_h, z_l, st4, sj, dirn]
                    own_hr = st4[:, 0]
                    ready = ~np.isnan(own_hr)
                    continue
                # only a neighbour whose HR level differs (asleep vs awake) may excuse a window
                gap = np.abs(st4[:, 0] - own_hr) >= s.neighbour_hr_gap_bpm
                better = ready & ~np.isnan(sc) & (sc < best[0]) & gap
                for j, v in enumerate((sc, z_h, z_l)):
                    best[j] = np.where(better, v, best[j])
                best[3] = np.where(better[:, None], st4, best[3])
                best[4] = np.where(better, sj, best[4])
                best[5] = np.where(better, dirn, best[5])
            score, z_hr, z_ln, st4, used_slot, dirn = best
            hr_med, ln_med = st4[:, 0], st4[:, 2]
            m = len(rows)
            idx = np.arange(m)
            gfirst = np.ones(m, bool)
            gfirst[1:] = ui[1:] != ui[:-1]
            gstarts = np.flatnonzero(gfirst)
            glen = np.diff(np.append(gstarts, m))
            gs = np.repeat(gstarts, glen)
            gend = gstarts + glen - 1
            # Has this person's source reported steps or motion in this or an earlier window?
            # (in window order, so streaming and batch agree). Without, a smaller HR rise
            # counts as activity: walks and stairs are the commonest look-alikes of stress.
            lseen = np.maximum.accumulate(np.where(reports_motion[rows], idx, -1))
            has_motion = (lseen >= gs) | self._has_motion[ui]
            self._has_motion[ui[gstarts]] = has_motion[gend]
            own = bl.stats[ui, si, 0]
            exercise = np.where(ready, h >= s.exercise_hr_ratio * own, h >= s.exercise_hr_bpm)
            steep = hr_peak[rows] - hr_low[rows] >= s.activity_hr_span_without_motion * own
            activity = ~has_motion & ready & ((hr_peak[rows] >= s.activity_hr_ratio_without_motion * own) | steep)
            move = moving[rows] | exercise | activity
            # recovery: a window starting before the end of the user's last exercise window +
            # motion_recovery_s, or of the last other movement window + activity_recovery_s
            until = self._motion_until_ns[ui]
            for mask, rec in ((exercise, rec_ns), (move, s.activity_recovery_s * NS)):
                lm = np.maximum.accumulate(np.where(mask, idx, -1))
                prev_lm = np.empty(m, np.int64)
                prev_lm[0] = -1
                prev_lm[1:] = lm[:-1]
                until = np.maximum(until, np.where(prev_lm >= gs, mend[np.maximum(prev_lm, 0)] + rec, NEVER))
                end_until = np.where(lm[gend] >= gstarts, mend[np.maximum(lm[gend], 0)] + rec, NEVER)
                self._motion_until_ns[ui[gstarts]] = np.maximum(self._motion_until_ns[ui[gstarts]], end_until)
            recovering = t0 < until
            suppressed = move | recovering
            ins = insufficient[rows]
            st = np.where(
                ins, INSUFFICIENT, np.where(~ready, CALIBRATING, np.where(suppressed, SUPPRESSED, np.where(score >= s.score_enter, ELEVATED, OK)))
            )
            evidence = np.where(st >= OK, score, np.nan)
            # the person's expected stress response in their own z units (a, b of evidence_llr)
            shift_hr = s.stress_hr_rise * st4[:, 0] / st4[:, 1]
            shift_ln = -np.log1p(-s.stress_rmssd_drop) / st4[:, 3]
            llr = np.where(st >= OK, evidence_llr(z_hr, z_ln, st4[:, 4], shift_hr, shift_ln), np.nan)
            acc, dirn = self._cusum(ui, gstarts, glen, llr, reset=(st == SUPPRESSED) | (st == CALIBRATING))
            # elevated: the accumulated evidence is at the deciding level (not one noisy window)
            st = np.where(st >= OK, np.where(acc >= s.cusum_h, ELEVATED, OK), st)
            in_ep, alert, ep_start = episodes.scan(
                self.episodes,
                ui,
                acc,
                t0,
                end_ns[rows],
                score_enter=s.cusum_h,
                score_exit=s.score_exit,
                sustain_windows=s.sustain_windows,
                exit_windows=s.exit_windows * per,  # calm minutes: the windows' worth
                cooldown_s=s.cooldown_s,
                exit_score=evidence,
            )
            # Baseline learns only from clean, calm windows outside episodes (SPEC: detection).
            learn = aligned[rows] & ~ins & ~suppressed & ~in_ep & (st != ELEVATED) & ~(score >= s.score_enter)
            if learn.any():
                bl.push(ui[learn], si[learn], h[learn], ln[learn])
            state[rows] = st
            out["hr_baseline"][rows] = hr_med
            out["ln_rmssd_baseline"][rows] = ln_med
            out["hr_z"][rows] = z_hr
            out["ln_rmssd_z"][rows] = z_ln
            out["score"][rows] = score
            slot_used[rows] = used_slot
            alert_all[rows] = alert
            ep_start_all[rows] = ep_start
            direction[rows] = dirn

        fa = {k: v[aligned] for k, v in f.items()}
        fa["w"] = w[aligned]
        feats = features_frame(fa, self._names, s)
        windows = feats.with_columns(
            *(pl.Series(k, v[aligned], pl.Float64).fill_nan(None) for k, v in out.items()),
            pl.Series("baseline_slot", slot_used[aligned], pl.Int64),
            pl.Series("state", STATES[state[aligned]], pl.String),
        ).select(list(WINDOW_SCHEMA))
        alerts = []
        for row in np.flatnonzero(alert_all):
            # the direction of the evidence that decided: both signals, HRV alone or HR alone
            reasons = []
            if direction[row] in (BOTH, HRV) and out["ln_rmssd_z"][row] <= -s.reason_z:
                reasons.append(Reason.HRV_BELOW_BASELINE)
            if direction[row] in (BOTH, HR) and out["hr_z"][row] >= s.reason_z:
                reasons.append(Reason.HR_ABOVE_BASELINE)
            if not reasons:
                reasons.append(Reason.HR_ABOVE_BASELINE if direction[row] == HR else Reason.HRV_BELOW_BASELINE)
            user = self._names[int(u[row])]
            ep = _dt(int(ep_start_all[row]))
            sc = float(out["score"][row])
            alerts.append(
                AlertDecision(
                    alert_id=alert_id_for(user, ep),
                    user=user,
                    raised_at=_dt(int(end_ns[row])),
                    episode_start=ep,
                    level=AlertLevel.HIGH if sc >= s.high_score else AlertLevel.ELEVATED,
                    reasons=tuple(reasons),
                    score=sc,
                )
            )
        alerts.sort(key=lambda a: (a.raised_at, a.user))
        return DetectorOutput(windows.cast(WINDOW_SCHEMA).sort("user", "window_start"), alerts)

    def _cusum(self, ui: np.ndarray, gstarts: np.ndarray, glen: np.ndarray, llr: np.ndarray, reset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One-sided CUSUM per user and direction of ``(llr - cusum_k) / minutes per
        window``, capped at ``cusum_h`` (``llr`` shape (3, rows), rows sorted by user then
        time, at most one refresh period per user). A direction without evidence (NaN) holds
        its sum; movement and calibration reset all three. Returns the largest sum after
        each row (NaN where the row had no evidence) and its direction. Walked row by row in
        rank order, vectorised over users, so it is the same arithmetic as streaming."""
        s = self.settings
        # Trailing windows one minute apart share all but one minute of their data: each
        # adds a minute's worth (1 / minutes per window) of a window's evidence, so a
        # person's evidence grows at the same rate per hour as with disjoint windows.
        hop = 60 / s.window_s
        m = len(ui)
        rank = np.arange(m) - np.repeat(gstarts, glen)
        order = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[order], np.arange(int(rank.max(initial=0)) + 2))
        sums = np.zeros((m, 3))
        c = self.episodes.cusum
        for j in range(len(bounds) - 1):
            r = order[bounds[j] : bounds[j + 1]]
            uu, x = ui[r], llr[:, r].T
            prev = c[uu]
            new = np.where(reset[r, None], 0.0, np.where(np.isnan(x), prev, np.clip(prev + (x - s.cusum_k) * hop, 0.0, s.cusum_h)))
            c[uu] = new
            sums[r] = new
        best = np.argmax(sums, axis=1).astype(np.int8)
        acc = np.where(np.isnan(llr).all(axis=0), np.nan, sums.max(axis=1))
        return acc, best

    # -- time zones --------------------------------------------------------------------
    def set_timezone(self, user: str, tz: str) -> None:
        """Score ``user``'s time-of-day slots in the IANA zone ``tz`` (default UTC).

        The seam for consent or configuration to say where a person lives; it applies to
        windows finished from now on (a move re-uses the same slots at local times)."""
        if not is_zone(tz):
            raise ConfigError(f"unknown time zone {tz!r} for a detector user")
        if tz not in self._tz_names:
            self._tz_names.append(tz)
        self._tz_wanted[user] = tz
        i = self._users.get(user)
        if i is not None and self._tz[i] != self._tz_names.index(tz):
            self._tz[i] = self._tz_names.index(tz)
            self._dirty[i] = True

    def _utc_offsets_s(self, u: np.ndarray, start_ns: np.ndarray) -> np.ndarray:
        """Seconds to add to UTC for each window's local time in its user's zone."""
        off = np.zeros(len(u), np.int64)
        code = self._tz[u]
        if len(u) == 0 or not code.any():
            return off
        for k in np.unique(code[code > 0]).tolist():
            m = code == k
            t = pl.Series(start_ns[m]).cast(pl.Datetime("ns", "UTC"))
            local = t.dt.convert_time_zone(self._tz_names[k]).dt.replace_time_zone(None).dt.epoch("ns").to_numpy()
            off[m] = (local - start_ns[m]) // NS
        return off

    # -- save / restore ------------------------------------------------------------------
    # Serialised form: arrays whose first axis is the user index (``users`` order) hold all
    # per-user state; buffered rows and chunk bounds are stored as (1, k) arrays and refer to
    # users by name (``row_users``), so dropping one user's row from every per-user array
    # (as :meth:`forget` does, and as the engine's erasure did before it existed) stays valid.
    _PER_USER = ("users", "watermark", "closed", "decided", "motion_until", "tz", "has_motion", "slot")

    def _arrays(self, lo: int = 0, hi: int | None = None) -> dict[str, np.ndarray]:
        """The state of users ``lo .. hi - 1`` (all by default) in the saved layout; views
        where it can (:meth:`state_arrays` and :meth:`chunk_state` copy). A part's buffered
        rows are the contiguous key range of its users in each piece (pieces are sorted by
        key), re-keyed from its first user."""
        n = len(self._users)
        hi = n if hi is None else hi
        whole = (lo, hi) == (0, n)
        names = list(self._users) if whole else self._names.slice(lo, hi - lo).to_list()
        kl, kh = lo << 32, hi << 32

        def part(key: np.ndarray) -> slice:
            return slice(None) if whole else slice(*np.searchsorted(key, [kl, kh]).tolist())

        pieces = [(c.beats.take(part(c.beats.key)), c.others.take(part(c.others.key)), c.min_w) for c in self._chunks]
        if not whole:
            pieces = [(b, o, m) for b, o, m in pieces if len(b.key) or len(o.key)]
        ppieces = [(c.partials.take(part(c.partials.key)), c.min_w) for c in self._pchunks]
        beats = Beats.concat([b for b, _, _ in pieces]) if pieces else Beats.empty()
        others = Others.concat([o for _, o, _ in pieces]) if pieces else Others.empty()
        parts = Partials.concat([p for p, _ in ppieces]) if ppieces else Partials.empty()
        if lo:  # keys name users by their number in this part
            beats, others, parts = (_rekeyed(x, -lo) for x in (beats, others, parts))  # type: ignore[assignment]
        rows = {
            "row_users": np.array(names, dtype=str),
            "chunk_min_w": np.array([m for _, _, m in pieces], np.int64),
            "chunk_len_b": np.array([len(b.key) for b, _, _ in pieces], np.int64),
            "chunk_len_o": np.array([len(o.key) for _, o, _ in pieces], np.int64),
            "pchunk_min_w": np.array([m for _, m in ppieces], np.int64),
            "pchunk_len": np.array([len(p.key) for p, _ in ppieces], np.int64),
            **{f"b_{f.name}": getattr(beats, f.name) for f in fields(beats)},
            **{f"o_{f.name}": getattr(others, f.name) for f in fields(others)},
            **{f"p_{f.name}": getattr(parts, f.name) for f in fields(parts)},
        }
        u = slice(lo, hi)
        return {
            "format": np.array(STATE_FORMAT),  # 0-d: never mistaken for a per-user array
            "users": np.array(names, dtype=str),
            "watermark": self._watermark_ns[u],
            "closed": self._closed_w[u],
            "decided": self._decided_m[u],
            "motion_until": self._motion_until_ns[u],
            "tz": self._tz[u],
            "has_motion": self._has_motion[u],
            "slot": self._slot[u],
            "tz_names": np.array(self._tz_names, dtype=str),
            "late": np.array([self.late_samples]),
            **{f"carry_{f.name}": getattr(self.carry, f.name)[u] for f in fields(self.carry)},
            **{f"bl_{f.name}": getattr(self.baselines, f.name)[u] for f in fields(self.baselines)},
            **{f"ep_{f.name}": getattr(self.episodes, f.name)[u] for f in fields(self.episodes)},
            **{k: v[None, ...] for k, v in rows.items()},
        }

    # -- incremental snapshots -------------------------------------------------------------
    # Users are saved in chunks of ``size`` storage slots (chunk = slot // size). A user's
    # slot is given when the detector first sees them, increases with the user number and is
    # never reused, so a chunk's users are a contiguous run of user numbers (their buffered
    # rows a contiguous key range) and stay in that chunk across :meth:`forget`, which only
    # vacates a slot. Users are independent: a chunk's state, taken at one point of the ingest
    # log, is complete for its users. What is not per user: ``tz_names`` (only grows; each
    # chunk carries the whole list, its users' ``tz`` index into it), ``late_samples`` (a
    # counter for operators; restored as the largest a chunk carries), the user numbering
    # (rebuilt from the slots at load) and the next slot (one past the largest restored).
    def dirty_chunks(self, size: int) -> list[int]:
        """Chunks with a user whose state changed (or who was forgotten) since their last
        :meth:`chunk_state`, in order."""
        touched = np.unique(self._slot[self._dirty] // size).tolist()
        return sorted(set(touched) | {v // size for v in self._vacated})

    def mark_chunks_dirty(self, chunks: list[int], size: int) -> None:
        """Save these chunks again (their last save failed)."""
        if chunks:
            self._dirty |= np.isin(self._slot // size, chunks)
            self._vacated |= {c * size for c in chunks}  # a chunk now empty is saved (removed) too

    def mark_all_dirty(self) -> None:
        """Save every user at the next save (state read from an earlier version's snapshot)."""
        self._dirty[:] = True

    def chunk_slots(self, size: int) -> list[int]:
        """Every chunk that holds a user now."""
        return np.unique(self._slot // size).tolist()

    def chunk_of(self, user: str, size: int) -> int | None:
        i = self._users.get(user)
        return None if i is None else int(self._slot[i]) // size

    def chunk_state(self, chunk: int, size: int) -> dict[str, np.ndarray] | None:
        """A copy of the state of the users in ``chunk`` (slots ``chunk * size ..``), in the
        layout :meth:`from_chunk_states` (or :meth:`from_bytes` of it alone) reads, and marks
        them clean; None if the chunk holds nobody now. Copies only those users' rows."""
        lo, hi = np.searchsorted(self._slot, [chunk * size, (chunk + 1) * size]).tolist()
        self._dirty[lo:hi] = False
        self._vacated = {v for v in self._vacated if v // size != chunk}
        if hi == lo:
            return None
        return {k: v.copy() for k, v in self._arrays(lo, hi).items()}

    @classmethod
    def from_chunk_states(cls, states: list[Mapping[str, np.ndarray]], settings: DetectorSettings | None = None) -> Detector:
        """One detector from the states of disjoint chunks (:meth:`chunk_state`, any order).
        Every user comes back clean (not dirty), with its slot."""
        for z in states:
            if "format" not in z or int(z["format"]) != STATE_FORMAT:
                _incompatible()
        states = sorted(states, key=lambda z: int(z["slot"][0]) if len(z["slot"]) else -1)
        if not states:
            return cls(settings)
        tz_names: list[str] = ["UTC"]
        for z in states:
            tz_names += [str(x) for x in z["tz_names"].tolist() if str(x) not in tz_names]
        per_user = [k for k in states[0] if k in cls._PER_USER or k.split("_", 1)[0] in ("carry", "bl", "ep")]
        out: dict[str, np.ndarray] = {"format": np.array(STATE_FORMAT), "tz_names": np.array(tz_names, dtype=str)}
        out["late"] = np.array([max(int(z["late"][0]) for z in states)])
        for k in per_user:
            if k == "tz":
                codes = [np.array([tz_names.index(str(x)) for x in z["tz_names"].tolist()], np.int16)[z["tz"]] for z in states]
                out[k] = np.concatenate(codes).astype(np.int16)
            else:
                out[k] = np.concatenate([z[k] for z in states])
        # buffered rows: piece j of the result is piece j of every chunk, users in order, so
        # each user's rows keep their pieces and order (and each piece stays sorted by key)
        offset = np.cumsum([0] + [len(z["users"]) for z in states[:-1]])
        groups = {"b": "chunk_len_b", "o": "chunk_len_o", "p": "pchunk_len"}
        row_keys = [k for k in states[0] if k.startswith(("b_", "o_", "p_"))]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in row_keys}
        lens: dict[str, list[int]] = {g: [] for g in groups.values()}
        mins: dict[str, list[int]] = {"chunk_min_w": [], "pchunk_min_w": []}
        for lens_key, min_key, prefixes in (("chunk_len_b", "chunk_min_w", ("b", "o")), ("pchunk_len", "pchunk_min_w", ("p",))):
            depth = max(len(z[min_key][0]) for z in states)
            bounds = {}
            for zi, z in enumerate(states):
                for pre in prefixes:
                    lk = groups[pre]
                    bounds[zi, pre] = np.concatenate([[0], np.cumsum(z[lk][0])])
            for j in range(depth):
                m = [int(z[min_key][0][j]) for z in states if j < len(z[min_key][0])]
                mins[min_key].append(min(m))
                for pre in prefixes:
                    total = 0
                    for zi, z in enumerate(states):
                        if j >= len(z[min_key][0]):
                            continue
                        b = bounds[zi, pre]
                        sl = slice(int(b[j]), int(b[j + 1]))
                        total += sl.stop - sl.start
                        for k in row_keys:
                            if k.startswith(pre + "_"):
                                v = z[k][0][sl]
                                cols[k].append(v + (int(offset[zi]) << 32) if k.endswith("_key") else v)
                    lens[groups[pre]].append(total)
        out["row_users"] = np.concatenate([z["users"] for z in states])[None, ...]
        for k in row_keys:
            dtype = states[0][k].dtype
            out[k] = (np.concatenate(cols[k]) if cols[k] else np.zeros(0, dtype)).astype(dtype, copy=False)[None, ...]
        for k, v in {**lens, **mins}.items():
            out[k] = np.array(v, np.int64)[None, ...]
        return cls._from_arrays(out, settings, fresh=True)

    def to_bytes(self) -> bytes:
        """Serialise all state (engine restart) as one .npz: per-user arrays and the buffers."""
        return serialise_state(self._arrays()).getvalue()

    def state_arrays(self) -> dict[str, np.ndarray]:
        """A copy of all state as the arrays :meth:`to_bytes` saves (a memory copy, a fraction
        of the serialisation's time): :func:`serialise_state` of it may run on another thread
        while this detector goes on."""
        return {k: v.copy() for k, v in self._arrays().items()}

    @classmethod
    def from_bytes(cls, data: bytes, settings: DetectorSettings | None = None) -> Detector:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls._from_arrays({k: z[k] for k in z.files}, settings, fresh=True)

    def forget(self, user: str) -> Detector:
        """A detector without ``user``'s state (baseline, episode, buffered beats): erasure."""
        if user not in self._users:
            return self
        i = self._users[user]
        z = self._arrays()
        per_user = [k for k in z if k in self._PER_USER or k.split("_", 1)[0] in ("carry", "bl", "ep")]
        for k in per_user:
            z[k] = np.delete(z[k], i, axis=0)
        d = self._from_arrays(z, self.settings)
        d._dirty = np.delete(self._dirty, i)
        d._vacated = self._vacated | {int(self._slot[i])}
        d._next_slot = self._next_slot
        return d

    @classmethod
    def _from_arrays(cls, z: dict[str, np.ndarray], settings: DetectorSettings | None, *, fresh: bool = False) -> Detector:
        """``fresh``: the arrays of ``z`` are the caller's own new ones, used without a copy."""

        def own(a: np.ndarray) -> np.ndarray:
            return a if fresh else a.copy()

        if "format" not in z or int(z["format"]) != STATE_FORMAT:
            _incompatible()
        d = cls(settings)
        d._users = {str(x): i for i, x in enumerate(z["users"].tolist())}
        d._names = pl.Series("user", list(d._users), pl.String)
        d._watermark_ns = own(z["watermark"])
        d._closed_w = own(z["closed"])
        d._decided_m = own(z["decided"])
        d._motion_until_ns = own(z["motion_until"])
        d._has_motion = own(z["has_motion"]) if "has_motion" in z else np.zeros(len(d._users), bool)
        d._tz_names = [str(x) for x in z["tz_names"].tolist()] if "tz_names" in z else ["UTC"]
        d._tz = z["tz"].astype(np.int16) if "tz" in z else np.zeros(len(d._users), np.int16)
        d._tz_wanted = {name: d._tz_names[int(k)] for name, k in zip(d._users, d._tz) if k}
        d.late_samples = int(z["late"][0])
        slot = z["slot"].astype(np.int64) if "slot" in z else np.zeros(0, np.int64)
        if len(slot) != len(d._users) or (len(slot) > 1 and not np.all(np.diff(slot) > 0)):
            slot = np.arange(len(d._users), dtype=np.int64)  # saved before slots (or tiled): numbered afresh
        d._slot = own(slot)
        d._next_slot = int(slot[-1]) + 1 if len(slot) else 0
        d._dirty = np.zeros(len(d._users), bool)
        d.carry = BeatCarry(*(own(z[f"carry_{f.name}"]) for f in fields(BeatCarry)))
        mine = np.arange(len(d._users), dtype=np.int64) << 32  # carried keys name their user: re-point them
        for k in (d.carry.ir_key, d.carry.kept_key):
            k[:] = np.where(k == NO_WINDOW, NO_WINDOW, mine | (k & LOW32))
        d.baselines = Baselines(*(own(z[f"bl_{f.name}"]) for f in fields(Baselines)))
        d.episodes = EpisodeState(*(own(z[f"ep_{f.name}"]) for f in fields(EpisodeState)))
        if z["row_users"].shape[0] == 0:  # the only user was removed with every (1, k) array
            return d
        row = {k: v[0] for k, v in z.items() if v.ndim >= 1 and k not in d._PER_USER and k.startswith(("row_", "chunk_", "pchunk_", "b_", "o_", "p_"))}
        old_names = row["row_users"].tolist()
        remap = np.array([d._users.get(str(x), -1) for x in old_names] + [-1], np.int64)

        def rekey(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            new_u = remap[key >> 32] if len(key) else np.zeros(0, np.int64)
            return (new_u << 32) | (key & LOW32), new_u >= 0

        beats = Beats(*(own(row[f"b_{f.name}"]) for f in fields(Beats)))
        others = Others(*(own(row[f"o_{f.name}"]) for f in fields(Others)))
        parts = Partials(*(own(row[f"p_{f.name}"]) for f in fields(Partials)))
        beats.key, ok_b = rekey(beats.key)
        others.key, ok_o = rekey(others.key)
        parts.key, ok_p = rekey(parts.key)
        cb = np.concatenate([[0], np.cumsum(row["chunk_len_b"])])
        co = np.concatenate([[0], np.cumsum(row["chunk_len_o"])])
        for i, m in enumerate(row["chunk_min_w"]):
            sb, so = slice(cb[i], cb[i + 1]), slice(co[i], co[i + 1])
            b = beats.take(sb).take(ok_b[sb])
            o = others.take(so).take(ok_o[so])
            if len(b.key) or len(o.key):
                d._chunks.append(_Chunk(b, o, int(m)))
        cp = np.concatenate([[0], np.cumsum(row["pchunk_len"])])
        for i, m in enumerate(row["pchunk_min_w"]):
            sp = slice(cp[i], cp[i + 1])
            p = parts.take(sp).take(ok_p[sp])
            if len(p.key):
                d._pchunks.append(_PChunk(p, int(m)))
        return d


def _incompatible() -> None:
    raise StorageError(
        "detector state was saved by an incompatible version; remove it to recalibrate from new data",
        path="detector state",
    )


def _rekeyed(x, shift_users: int):  # type: ignore[no-untyped-def]
    """``x`` (Beats, Others or Partials) with its keys' user numbers moved by ``shift_users``."""
    return replace(x, key=x.key + (shift_users << 32))


def serialise_state(arrays: Mapping[str, np.ndarray]) -> io.BytesIO:
    """``arrays`` (:meth:`Detector.state_arrays`) as the .npz that :meth:`Detector.from_bytes` reads."""
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out


def _reduce_pieces(beats: list[Beats], others: list[Others], s: DetectorSettings) -> Partials:
    """Minute-block partials of finished rows held in several pieces (each sorted by block
    key, pieces in arrival order). A block's rows are reduced together and in time order, so
    the result is the same as for one sorted piece. Blocks whose rows sit in one piece (almost
    all) are reduced in place; only blocks spread over pieces are gathered and merged."""
    if len(beats) == 1:
        return block_partials(beats[0], others[0], s)
    keys = [merge_keys(b.key[_segments(b.key)], o.key[_segments(o.key)]) for b, o in zip(beats, others)]
    allk = np.concatenate(keys)
    uniq, counts = np.unique(allk, return_counts=True)
    shared = uniq[counts > 1]
    parts: list[Partials] = []
    for b, o in zip(beats, others):
        p = block_partials(b, o, s)
        if len(shared):
            p = p.take(~np.isin(p.key, shared))
        parts.append(p)
    if len(shared):

        def rows_of(key: np.ndarray) -> np.ndarray:
            lo = np.searchsorted(key, shared, side="left")
            hi = np.searchsorted(key, shared, side="right")
            n = hi - lo
            return np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())

        sb = [b.take(rows_of(b.key)) for b in beats]
        so = [o.take(rows_of(o.key)) for o in others]
        mb, mo = Beats.concat(sb), Others.concat(so)
        mb = mb.take(np.argsort(mb.key, kind="stable"))
        mo = mo.take(np.argsort(mo.key, kind="stable"))
        parts.append(block_partials(mb, mo, s))
    p = Partials.concat(parts)
    return p.take(np.argsort(p.key, kind="stable"))


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // NS, tz=timezone.utc).replace(microsecond=(ns % NS) // 1000)
