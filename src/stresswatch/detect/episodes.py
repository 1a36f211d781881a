"""Episode logic: sustained evidence, hysteresis, cooldown. Pure array-in, array-out.

Per user: an episode starts at the window completing ``sustain_windows`` consecutive windows
with ``score >= score_enter``; it ends at the window completing ``exit_windows`` consecutive
windows with ``score < score_exit``; between the two thresholds it neither grows nor ends
(hysteresis). An alert is raised when an episode starts, unless the user's previous alert
was raised less than ``cooldown_s`` ago. Windows without a score (calibrating, gaps,
movement) break a run of elevated or calm windows but neither start nor end an episode.

:func:`scan` evaluates this state machine for many windows of many users at once: runs are
distances to the last breaking window (``np.maximum.accumulate`` over row indices), and a
user is in an episode when its last start candidate is later than its last end candidate.
Only alert cooldowns, a handful of rows, are walked one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

NO_TIME = np.iinfo(np.int64).min


@dataclass
class EpisodeState:
    run: np.ndarray  # consecutive elevated windows
    run_start_ns: np.ndarray  # start of the first of them
    calm: np.ndarray  # consecutive calm windows
    in_episode: np.ndarray  # bool
    episode_start_ns: np.ndarray
    last_alert_ns: np.ndarray
    cusum: np.ndarray  # (users, 3) float64: accumulated evidence per direction (both, HR, HRV), 0..cusum_h

    @classmethod
    def empty(cls, users: int = 0) -> EpisodeState:
        z = np.zeros(users, np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(users, bool), z.copy(), np.full(users, NO_TIME, np.int64), np.zeros((users, 3)))

    def grow(self, users: int) -> None:
        extra = users - len(self.run)
        if extra <= 0:
            return
        fresh = EpisodeState.empty(extra)
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(fresh, f.name)]))


def _last_flag(flag: np.ndarray, idx: np.ndarray, group_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row index of the last row at or before each row with ``flag`` in the same group, and
    whether there is one (rows of one group are contiguous)."""
    last = np.maximum.accumulate(np.where(flag, idx, -1))
    return last, last >= group_start


def scan(
    state: EpisodeState,
    u: np.ndarray,
    score: np.ndarray,
    window_start_ns: np.ndarray,
    window_end_ns: np.ndarray,
    *,
    score_enter: float,
    score_exit: float,
    sustain_windows: int,
    exit_windows: int,
    cooldown_s: int,
    exit_score: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advance users over their windows; rows sorted by user then time, NaN score = no evidence.

    ``exit_score`` (default ``score``) is what the exit rule compares with ``score_exit``:
    the detector starts episodes on accumulated evidence (CUSUM) and ends them on the
    window's own score. Returns (in episode after each window, alert mask, episode start
    ns), aligned with rows, and updates ``state`` to the end of each user's rows.
    """
    n = len(u)
    if n == 0:
        z = np.zeros(0, bool)
        return z, z, np.zeros(0, np.int64)
    idx = np.arange(n)
    first = np.ones(n, bool)
    first[1:] = u[1:] != u[:-1]
    gstarts = np.flatnonzero(first)
    lengths = np.diff(np.append(gstarts, n))
    gs = np.repeat(gstarts, lengths)
    gu = u[gstarts]
    ends = gstarts + lengths - 1

    has = ~np.isnan(score)
    hot = has & (score >= score_enter)
    ex = score if exit_score is None else exit_score
    cool = ~np.isnan(ex) & (ex < score_exit)

    # consecutive hot / cool windows ending at each row, continuing the carried runs
    hb, h_in = _last_flag(~hot, idx, gs)
    hot_run = idx - np.where(h_in, hb, gs - 1 - state.run[u])
    cb, c_in = _last_flag(~cool, idx, gs)
    cool_run = idx - np.where(c_in, cb, gs - 1 - state.calm[u])
    run_start = np.where(
        h_in,
        window_start_ns[np.minimum(hb + 1, n - 1)],
        np.where(state.run[u] > 0, state.run_start_ns[u], window_start_ns[gs]),
    )

    carry_in = state.in_episode[u]
    ls, s_in = _last_flag(hot_run >= sustain_windows, idx, gs)
    le, e_in = _last_flag(cool_run >= exit_windows, idx, gs)
    s_pos = np.where(s_in, ls, np.where(carry_in, gs - 1, -2))
    e_pos = np.where(e_in, le, np.where(carry_in, -2, gs - 1))
    in_ep = s_pos > e_pos
    prev_in = np.empty(n, bool)
    prev_in[1:] = in_ep[:-1]
    prev_in[gstarts] = state.in_episode[gu]
    flip = in_ep & ~prev_in

    lf, f_in = _last_flag(flip, idx, gs)
    ep_start = np.where(f_in, run_start[np.maximum(lf, 0)], state.episode_start_ns[u])

    alert = np.zeros(n, bool)
    cooldown_ns = cooldown_s * 1_000_000_000
    for r in np.flatnonzero(flip):
        uu = u[r]
        last = state.last_alert_ns[uu]
        if last == NO_TIME or window_end_ns[r] - last >= cooldown_ns:
            alert[r] = True
            state.last_alert_ns[uu] = window_end_ns[r]

    state.run[gu] = hot_run[ends]
    state.run_start_ns[gu] = np.where(hot_run[ends] > 0, run_start[ends], state.run_start_ns[gu])
    state.calm[gu] = cool_run[ends]
    state.in_episode[gu] = in_ep[ends]
    state.episode_start_ns[gu] = ep_start[ends]
    return in_ep, alert, ep_start
