"""Episode logic: sustained evidence, hysteresis, cooldown. Pure array-in, array-out.

Per user: an episode starts after ``sustain_windows`` consecutive windows with
``score >= score_enter``; it ends after ``exit_windows`` consecutive windows with
``score < score_exit``; between the two thresholds it neither grows nor ends (hysteresis).
An alert is raised when an episode starts, unless the user's previous alert was raised
less than ``cooldown_s`` ago. Windows without a score (calibrating, gaps, motion) break a
run of elevated windows but do not end an episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_TIME = np.iinfo(np.int64).min


@dataclass
class EpisodeState:
    run: np.ndarray  # consecutive elevated windows
    run_start_ns: np.ndarray  # start of the first of them
    calm: np.ndarray  # consecutive calm windows while in an episode
    in_episode: np.ndarray  # bool
    episode_start_ns: np.ndarray
    last_alert_ns: np.ndarray

    @classmethod
    def empty(cls, users: int = 0) -> EpisodeState:
        z = np.zeros(users, np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(users, bool), z.copy(), np.full(users, NO_TIME, np.int64))

    def grow(self, users: int) -> None:
        extra = users - len(self.run)
        if extra <= 0:
            return
        fresh = EpisodeState.empty(extra)
        for name in self.__dataclass_fields__:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(fresh, name)]))


def step(
    state: EpisodeState,
    idx: np.ndarray,
    score: np.ndarray,
    window_start_ns: np.ndarray,
    window_end_ns: np.ndarray,
    *,
    score_enter: float,
    score_exit: float,
    sustain_windows: int,
    exit_windows: int,
    cooldown_s: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Advance users ``idx`` (unique) by one window each; NaN score = no evidence.

    Returns (alert mask, episode start ns) aligned with ``idx``.
    """
    has = ~np.isnan(score)
    hot = has & (score >= score_enter)
    cool = has & (score < score_exit)

    run = np.where(hot, state.run[idx] + 1, 0)
    run_start = np.where(hot & (state.run[idx] == 0), window_start_ns, state.run_start_ns[idx])
    in_ep = state.in_episode[idx].copy()
    calm = np.where(in_ep & cool, state.calm[idx] + 1, 0)

    ending = in_ep & (calm >= exit_windows)
    in_ep &= ~ending
    calm[ending] = 0

    starting = ~in_ep & (run >= sustain_windows)
    ep_start = np.where(starting, run_start, state.episode_start_ns[idx])
    in_ep |= starting
    last = state.last_alert_ns[idx]
    cooled = (last == NO_TIME) | (window_end_ns - last >= cooldown_s * 1_000_000_000)
    alert = starting & cooled
    last = np.where(alert, window_end_ns, last)

    state.run[idx] = run
    state.run_start_ns[idx] = run_start
    state.calm[idx] = calm
    state.in_episode[idx] = in_ep
    state.episode_start_ns[idx] = ep_start
    state.last_alert_ns[idx] = last
    return alert, ep_start
