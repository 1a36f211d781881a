"""The detector: sample batches in, finished windows and alert decisions out.

A window ``[start, start + window_s)`` is finished for a user once a sample of that user at
or after its end has arrived (or on :meth:`Detector.flush` / :meth:`Detector.advance`).
So feeding the same samples in any chunking, with each user's batches in time order, yields
the same windows and alerts as one batch pass. Samples that arrive for an already finished
window are dropped and counted in :attr:`Detector.late_samples`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import polars as pl

from ..config import DetectorSettings
from ..model import WINDOW_SCHEMA, AlertDecision, AlertLevel, Reason, WindowState, alert_id_for, empty_samples
from . import episodes
from .baseline import Baselines
from .episodes import EpisodeState
from .features import NS, window_features

REASON_Z = 1.0  # a feature names itself as a reason once it is a robust SD from baseline


@dataclass(frozen=True)
class DetectorOutput:
    windows: pl.DataFrame  # WINDOW_SCHEMA, sorted by user then window_start
    alerts: list[AlertDecision] = field(default_factory=list)


def _empty_windows() -> pl.DataFrame:
    return pl.DataFrame(schema=WINDOW_SCHEMA)


class Detector:
    """Per-user streaming state over many users; arrays, not objects per user."""

    def __init__(self, settings: DetectorSettings | None = None) -> None:
        self.settings = settings or DetectorSettings()
        self._users: dict[str, int] = {}
        self._buffer = empty_samples()
        self._watermark_ns = np.zeros(0, np.int64)
        self._closed_until_ns = np.zeros(0, np.int64)  # windows starting before this are finished
        self.baselines = Baselines.empty(self.settings.baseline_windows)
        self.episodes = EpisodeState.empty()
        self.late_samples = 0

    # -- users -------------------------------------------------------------------------
    def _index(self, users: list[str]) -> np.ndarray:
        for u in users:
            if u not in self._users:
                self._users[u] = len(self._users)
        n = len(self._users)
        if len(self._watermark_ns) < n:
            extra = n - len(self._watermark_ns)
            self._watermark_ns = np.concatenate([self._watermark_ns, np.full(extra, np.iinfo(np.int64).min)])
            self._closed_until_ns = np.concatenate([self._closed_until_ns, np.full(extra, np.iinfo(np.int64).min)])
            self.baselines.grow(n)
            self.episodes.grow(n)
        return np.array([self._users[u] for u in users], np.int64)

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def baseline_ready(self, user: str) -> bool:
        i = self._users.get(user)
        return i is not None and int(self.baselines.count[i]) >= self.settings.baseline_min_windows

    # -- streaming API -------------------------------------------------------------------
    def update(self, batch: pl.DataFrame) -> DetectorOutput:
        """Add a validated samples batch; return the windows it finished."""
        if batch.height == 0:
            return DetectorOutput(_empty_windows())
        w_ns = self.settings.window_s * NS
        per_user = batch.group_by("user").agg(pl.col("time").dt.epoch("ns").max().alias("t_max"))
        idx = self._index(per_user.get_column("user").to_list())
        np.maximum.at(self._watermark_ns, idx, per_user.get_column("t_max").to_numpy())

        frame = self._tag(pl.concat([self._buffer, batch], how="vertical"))
        late = frame.filter(pl.col("_w") < pl.col("_closed"))
        self.late_samples += late.height
        frame = frame.filter(pl.col("_w") >= pl.col("_closed"))
        done = (pl.col("_w") + w_ns) <= pl.col("_wm")
        return self._finish(frame.filter(done), frame.filter(~done))

    def flush(self) -> DetectorOutput:
        """Finish every open window (end of a replay)."""
        frame = self._tag(self._buffer)
        return self._finish(frame, frame.clear())

    def advance(self, now_ns: int, grace_s: int = 60) -> DetectorOutput:
        """Finish windows that ended more than ``grace_s`` before ``now_ns`` (live engine tick)."""
        frame = self._tag(self._buffer)
        done = (pl.col("_w") + (self.settings.window_s + grace_s) * NS) <= now_ns
        return self._finish(frame.filter(done), frame.filter(~done))

    # -- internals -----------------------------------------------------------------------
    def _tag(self, frame: pl.DataFrame) -> pl.DataFrame:
        w_ns = self.settings.window_s * NS
        users = pl.DataFrame(
            {
                "user": list(self._users),
                "_wm": self._watermark_ns[: len(self._users)],
                "_closed": self._closed_until_ns[: len(self._users)],
            },
            schema={"user": pl.String, "_wm": pl.Int64, "_closed": pl.Int64},
        )
        t = pl.col("time").dt.epoch("ns")
        return frame.with_columns(((t // w_ns) * w_ns).alias("_w")).join(users, on="user", how="left")

    def _finish(self, done: pl.DataFrame, keep: pl.DataFrame) -> DetectorOutput:
        self._buffer = keep.select(empty_samples().columns)
        if done.height == 0:
            return DetectorOutput(_empty_windows())
        w_ns = self.settings.window_s * NS
        last = done.group_by("user").agg(pl.col("_w").max())
        li = self._index(last.get_column("user").to_list())
        self._closed_until_ns[li] = np.maximum(self._closed_until_ns[li], last.get_column("_w").to_numpy() + w_ns)
        feats = window_features(done.select(empty_samples().columns), self.settings)
        return self._decide(feats)

    def _decide(self, feats: pl.DataFrame) -> DetectorOutput:
        s = self.settings
        n = feats.height
        users = feats.get_column("user").to_list()
        u = np.array([self._users[x] for x in users], np.int64)
        start_ns = feats.get_column("window_start").dt.epoch("ns").to_numpy()
        end_ns = feats.get_column("window_end").dt.epoch("ns").to_numpy()
        hr = feats.get_column("hr_mean").fill_null(np.nan).to_numpy().astype(np.float64)
        lnr = feats.get_column("ln_rmssd").fill_null(np.nan).to_numpy().astype(np.float64)
        cov = feats.get_column("coverage").to_numpy().astype(np.float64)
        steps_pm = feats.get_column("steps").to_numpy() / (s.window_s / 60.0)
        rank = feats.select(pl.int_range(pl.len()).over("user")).to_series().to_numpy()

        cols = {k: np.full(n, np.nan) for k in ("hr_baseline", "hr_z", "ln_rmssd_baseline", "ln_rmssd_z", "score")}
        state = np.empty(n, object)
        alerts: list[AlertDecision] = []
        for r in range(int(rank.max()) + 1 if n else 0):
            rows = np.flatnonzero(rank == r)
            ui = u[rows]
            hr_med, hr_sd, ln_med, ln_sd = self.baselines.stats(ui)
            ready = self.baselines.count[ui] >= s.baseline_min_windows
            h, ln = hr[rows], lnr[rows]
            insufficient = (cov[rows] < s.min_coverage) | np.isnan(h)
            motion = (steps_pm[rows] >= s.motion_steps_per_min) | (ready & (h > s.exercise_hr_ratio * hr_med))
            z_hr = (h - hr_med) / hr_sd
            z_ln = (ln - ln_med) / ln_sd
            # Mean of the available evidence: HR up and ln RMSSD down (HR-only: HR alone).
            score = np.where(np.isnan(z_ln), z_hr, 0.5 * (z_hr - z_ln))
            st = np.where(
                insufficient,
                WindowState.INSUFFICIENT_DATA.value,
                np.where(
                    ~ready,
                    WindowState.CALIBRATING.value,
                    np.where(
                        motion,
                        WindowState.SUPPRESSED_MOTION.value,
                        np.where(score >= s.score_enter, WindowState.ELEVATED.value, WindowState.OK.value),
                    ),
                ),
            )
            scored = (st == WindowState.OK.value) | (st == WindowState.ELEVATED.value)
            evidence = np.where(scored, score, np.nan)
            alert, ep_start = episodes.step(
                self.episodes,
                ui,
                evidence,
                start_ns[rows],
                end_ns[rows],
                score_enter=s.score_enter,
                score_exit=s.score_exit,
                sustain_windows=s.sustain_windows,
                exit_windows=s.exit_windows,
                cooldown_s=s.cooldown_s,
            )
            # Baseline learns only from clean, calm windows outside episodes (SPEC: detection).
            learn = ~insufficient & ~motion & ~self.episodes.in_episode[ui] & ~(scored & (score >= s.score_enter))
            if learn.any():
                self.baselines.push(ui[learn], h[learn], ln[learn])

            state[rows] = st
            cols["hr_baseline"][rows] = hr_med
            cols["ln_rmssd_baseline"][rows] = ln_med
            cols["hr_z"][rows] = np.where(ready, z_hr, np.nan)
            cols["ln_rmssd_z"][rows] = np.where(ready, z_ln, np.nan)
            cols["score"][rows] = np.where(ready, score, np.nan)
            for j in np.flatnonzero(alert):
                row = rows[j]
                reasons = []
                if z_ln[j] <= -REASON_Z:
                    reasons.append(Reason.HRV_BELOW_BASELINE)
                if z_hr[j] >= REASON_Z:
                    reasons.append(Reason.HR_ABOVE_BASELINE)
                ep = _dt(int(ep_start[j]))
                user = users[row]
                alerts.append(
                    AlertDecision(
                        alert_id=alert_id_for(user, ep),
                        user=user,
                        raised_at=_dt(int(end_ns[row])),
                        episode_start=ep,
                        level=AlertLevel.HIGH if score[j] >= s.high_score else AlertLevel.ELEVATED,
                        reasons=tuple(reasons),
                        score=float(score[j]),
                    )
                )
        windows = feats.with_columns(
            *(pl.Series(k, v, pl.Float64).fill_nan(None) for k, v in cols.items()),
            pl.Series("state", state.astype(str), pl.String),
        ).select(list(WINDOW_SCHEMA))
        alerts.sort(key=lambda a: (a.raised_at, a.user))
        return DetectorOutput(windows.cast(WINDOW_SCHEMA), alerts)

    # -- save / restore ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise all state (engine restart): arrays in .npz, open-window samples as Arrow IPC."""
        buf = io.BytesIO()
        self._buffer.write_ipc(buf)
        arrays = {
            "users": np.array(list(self._users), dtype=object).astype(str),
            "watermark": self._watermark_ns,
            "closed": self._closed_until_ns,
            "bl_hr": self.baselines.hr,
            "bl_ln": self.baselines.ln_rmssd,
            "bl_head": self.baselines.head,
            "bl_count": self.baselines.count,
            "late": np.array([self.late_samples]),
            "buffer": np.frombuffer(buf.getvalue(), np.uint8),
            **{f"ep_{k}": getattr(self.episodes, k) for k in self.episodes.__dataclass_fields__},
        }
        out = io.BytesIO()
        np.savez(out, **arrays)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, settings: DetectorSettings | None = None) -> Detector:
        d = cls(settings)
        z = np.load(io.BytesIO(data), allow_pickle=False)
        d._users = {u: i for i, u in enumerate(z["users"].tolist())}
        d._watermark_ns = z["watermark"].copy()
        d._closed_until_ns = z["closed"].copy()
        d.baselines = Baselines(d.settings.baseline_windows, z["bl_hr"].copy(), z["bl_ln"].copy(), z["bl_head"].copy(), z["bl_count"].copy())
        d.episodes = EpisodeState(**{k: z[f"ep_{k}"].copy() for k in EpisodeState.__dataclass_fields__})
        d.late_samples = int(z["late"][0])
        d._buffer = pl.read_ipc(io.BytesIO(z["buffer"].tobytes()))
        return d


def _dt(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // NS, tz=timezone.utc).replace(microsecond=(ns % NS) // 1000)
