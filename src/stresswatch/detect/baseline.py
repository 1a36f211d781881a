"""Personal baselines: robust (median / MAD) over each user's trailing clean windows.

State is struct-of-arrays over users so one call serves many users at once. Memory per user
is fixed by ``baseline_windows``: two float32 rings (HR and ln RMSSD) plus two counters,
8 * baseline_windows + 16 bytes (3,472 B at the default 432 windows), whatever the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation
HR_SCALE_FLOOR_BPM = 2.0  # a very steady person must not turn 1 bpm into a large z-score
LN_RMSSD_SCALE_FLOOR = 0.08  # ~8 % RMSSD, for the same reason


@dataclass
class Baselines:
    capacity: int
    hr: np.ndarray  # (users, capacity) float32, NaN where empty
    ln_rmssd: np.ndarray
    head: np.ndarray  # (users,) next slot to write
    count: np.ndarray  # (users,) windows ever pushed, saturating at capacity

    @classmethod
    def empty(cls, capacity: int, users: int = 0) -> Baselines:
        return cls(
            capacity,
            np.full((users, capacity), np.nan, np.float32),
            np.full((users, capacity), np.nan, np.float32),
            np.zeros(users, np.int64),
            np.zeros(users, np.int64),
        )

    def grow(self, users: int) -> None:
        extra = users - len(self.head)
        if extra <= 0:
            return
        pad = np.full((extra, self.capacity), np.nan, np.float32)
        self.hr = np.vstack([self.hr, pad])
        self.ln_rmssd = np.vstack([self.ln_rmssd, pad.copy()])
        self.head = np.concatenate([self.head, np.zeros(extra, np.int64)])
        self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])

    def stats(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hr median, hr scale, ln RMSSD median, ln RMSSD scale) for users ``idx``; NaN if empty."""
        out = []
        for ring, floor in ((self.hr[idx], HR_SCALE_FLOOR_BPM), (self.ln_rmssd[idx], LN_RMSSD_SCALE_FLOOR)):
            with np.errstate(all="ignore"), _quiet():
                med = np.nanmedian(ring, axis=1)
                mad = np.nanmedian(np.abs(ring - med[:, None]), axis=1)
            out += [med.astype(np.float64), np.maximum(MAD_TO_SD * mad.astype(np.float64), floor)]
        return out[0], out[1], out[2], out[3]

    def push(self, idx: np.ndarray, hr: np.ndarray, ln_rmssd: np.ndarray) -> None:
        """Append one window per user in ``idx`` (unique users); NaN features are stored as NaN."""
        slot = self.head[idx]
        self.hr[idx, slot] = hr
        self.ln_rmssd[idx, slot] = ln_rmssd
        self.head[idx] = (slot + 1) % self.capacity
        self.count[idx] = np.minimum(self.count[idx] + 1, self.capacity)


class _quiet:
    """np.nanmedian warns on all-NaN rows; an empty baseline is expected, not a problem."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)
