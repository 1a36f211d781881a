"""Simulated users for the load harness: their data, their consent, their calibrated state.

* **Data**: a few template people from the cohort simulator (``stresswatch_fixtures.cohort``:
  real NSRDB beat-to-beat variability, sleep, walks, exercise, gaps, artefacts). Simulated user
  ``i`` replays template ``i % T`` at the same time of day, shifted by its own 0-60 min, so
  users do not send identical beats in lockstep. One beat per second-ish, as a chest strap.
* **Stressed users** (every ``stressed_every``-th): their RR is changed as acute stress does
  (HR +25 %, beat-to-beat variability down by two thirds), so they raise alerts whose latency is measured.
* **Calibration**: a real :class:`Detector` learns the templates' first two days; its per-user
  state is tiled to all N users (so the engine starts with N calibrated users, as a service
  that has been running for days). A stressed user starts with one elevated window already
  counted, so its alert comes at the first window boundary of the run, not ten minutes in.
* **Sample clock** = wall clock + ``offset_ns`` (less than one window): it puts the first
  window boundary ``boundary_after_s`` into the run. Users still send in real time.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from stresswatch.wire import binary as wire
from stresswatch.config import DetectorSettings
from stresswatch.consent.ledger import ConsentLedger
from stresswatch.consent.state import Action, ConsentEvent
from stresswatch.detect import Detector
from stresswatch.detect.baseline import user_phase
from stresswatch.detect.episodes import EpisodeState
from stresswatch.detect.features import BeatCarry

NS = 1_000_000_000
DAY_NS = 86400 * NS
NEVER = np.iinfo(np.int64).min
CACHE = Path("/tmp/stresswatch-load-cache")


@dataclass
class Templates:
    """T people's samples, concatenated: ``t[off[j]:off[j+1]]`` are template j's (sorted)."""

    t: np.ndarray
    code: np.ndarray
    value: np.ndarray
    off: np.ndarray
    start_ns: int  # midnight UTC of the cohort's first day
    names: list[str]

    @property
    def count(self) -> int:
        return len(self.off) - 1


def load_templates(count: int = 8, days: int = 4, seed: int = 20261126) -> tuple[Templates, pl.DataFrame]:
    """The templates (cached under /tmp: the simulator takes a few seconds) and their samples frame."""
    path = CACHE / f"cohort_{count}_{days}_{seed}.parquet"
    if path.exists():
        frame = pl.read_parquet(path)
    else:
        from stresswatch_fixtures.cohort import CohortSpec, simulate

        frame, _ = simulate(CohortSpec(users=count, days=days, seed=seed))
        CACHE.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    frame = frame.sort("user", "time")
    names = frame.get_column("user").unique(maintain_order=True).to_list()
    lens = frame.group_by("user", maintain_order=True).len().get_column("len").to_numpy()
    t = frame.get_column("time").dt.epoch("ns").to_numpy()
    code = np.array([wire.METRIC_CODE[m] for m in frame.get_column("metric").to_list()], np.uint8)
    start = int(t.min()) // DAY_NS * DAY_NS
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Templates(t, code, frame.get_column("value").to_numpy().astype(np.float64), off, start, names), frame


def synthetic_templates(count: int, start_ns: int, days: int = 3, seed: int = 1) -> Templates:
    """Plain templates (60-75 bpm, RR jitter) for tests: one RR sample per beat over ``days``."""
    rng = np.random.default_rng(seed)
    ts, vs = [], []
    for _ in range(count):
        rr = np.round(rng.uniform(800, 1000) + rng.normal(0, 40, int(days * 86400 / 0.8)), 1)
        t = start_ns + np.cumsum((rr * 1e6).astype(np.int64))
        keep = t < start_ns + days * DAY_NS
        ts.append(t[keep])
        vs.append(rr[keep])
    off = np.concatenate([[0], np.cumsum([len(t) for t in ts])]).astype(np.int64)
    t = np.concatenate(ts)
    return Templates(t, np.zeros(len(t), np.uint8), np.concatenate(vs), off, start_ns, [f"t{j}" for j in range(count)])


def calibrate(frame: pl.DataFrame, templates: Templates, settings: DetectorSettings, days: int = 2) -> Detector:
    """A detector that has learned the templates' first ``days`` days (baselines ready)."""
    cutoff = datetime.fromtimestamp((templates.start_ns + days * DAY_NS) / NS, tz=timezone.utc)
    det = Detector(settings)
    det.update(frame.filter(pl.col("time") < cutoff))
    det.flush()
    return det


@dataclass
class Plan:
    """What the harness, the publishers and the seeding agree on."""

    n_users: int
    batch_s: float
    window_s: int
    stressed_every: int
    t0_wall: float  # publishing starts (wall clock, s)
    offset_ns: int  # sample clock - wall clock
    day_shift_ns: int  # template time + day_shift + user shift = sample time
    fmt: str = "binary"
    prefix: str = "stresswatch/v1"
    run_id: str = "load"

    @staticmethod
    def make(n_users: int, batch_s: float, window_s: int, stressed_every: int, t0_wall: float, boundary_after_s: float,
             templates: Templates, fmt: str = "binary", run_id: str = "load") -> Plan:  # fmt: skip
        w = window_s * NS
        t0 = int(t0_wall * NS)
        # first window boundary (sample clock) boundary_after_s after t0
        target = t0 + int(boundary_after_s * NS)
        offset = (-target) % w  # sample(target) = target + offset is a multiple of w
        sample_t0 = t0 + offset
        # the templates' third day (index 2) at the same time of day, minus the users' shifts
        day_shift = (sample_t0 // DAY_NS) * DAY_NS - (templates.start_ns + 2 * DAY_NS)
        return Plan(n_users, batch_s, window_s, stressed_every, t0_wall, offset, day_shift, fmt, run_id=run_id)

    def user(self, i: int) -> str:
        return f"u{i:07d}"

    def stressed(self, i: int) -> bool:
        return self.stressed_every > 0 and i % self.stressed_every == 0

    def shift_ns(self, n: int) -> np.ndarray:
        """Each user's own shift of its template (0-60 min, whole seconds), deterministic."""
        return np.random.default_rng(7).integers(0, 3600, n).astype(np.int64) * NS

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def seed_consent(db_path: Path, plan: Plan, workers: list[str], now: datetime) -> None:
    """Every user granted, alerts to one worker each (round robin), shown under their own id so
    the harness can match alerts to users (a real deployment shows a pseudonym)."""
    with ConsentLedger(db_path) as ledger:
        ledger._db.execute("PRAGMA synchronous=OFF")  # seeding only: a crash just means re-seeding
        for i in range(plan.n_users):
            name = plan.user(i)
            ledger.append(
                ConsentEvent(name, Action.GRANT, now, "load", recipients=(workers[i % len(workers)],), display_name=name,
                             event_id=f"load-{name}")
            )  # fmt: skip


def detector_blob(template: Detector, templates: Templates, plan: Plan, settings: DetectorSettings) -> bytes:
    """The template's calibrated state tiled to ``plan.n_users`` users, as Detector.to_bytes:
    user i gets the baselines of template ``i % T`` (the one whose beats it replays), a fresh
    beat carry and episode state, and no buffered samples (the template's buffers name only
    template users, so restoring drops them)."""
    z = dict(np.load(io.BytesIO(template.to_bytes()), allow_pickle=False))
    n = plan.n_users
    row = {name: k for k, name in enumerate(z["users"].tolist())}
    idx = np.array([row[name] for name in templates.names])[np.arange(n) % templates.count]
    names = [plan.user(i) for i in range(n)]
    for key in [k for k in z if k in Detector._PER_USER or k.split("_", 1)[0] in ("carry", "bl", "ep")]:
        z[key] = z[key][idx]
    z["users"] = np.array(names, dtype=str)
    for key in ("watermark", "closed", "motion_until"):
        if key in z:
            z[key] = np.full(n, NEVER, np.int64)
    carry = BeatCarry.empty(n)
    for f in fields(carry):
        z[f"carry_{f.name}"] = getattr(carry, f.name)
    periods = settings.baseline_refresh_s // settings.window_s
    z["bl_phase"] = np.array([user_phase(x, periods) for x in names], np.int16)
    z["bl_stamp"] = np.full(n, NEVER, np.int64)
    ep = EpisodeState.empty(n)
    stressed = np.array([plan.stressed(i) for i in range(n)])
    w = settings.window_s * NS
    ep.run[stressed] = settings.sustain_windows - 1  # one elevated window already counted
    ep.cusum[stressed] = settings.cusum_h  # the evidence is already at the deciding level
    ep.run_start_ns[:] = (int(plan.t0_wall * NS) + plan.offset_ns) // w * w - w
    for f in fields(ep):
        z[f"ep_{f.name}"] = getattr(ep, f.name)
    b = io.BytesIO()
    np.savez(b, **z)
    return b.getvalue()


def stress(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Acute stress on RR: HR +15 %, successive differences x0.35 (RMSSD ~ -65 %): strong
    enough to be elevated even against the least alarming neighbouring time-of-day baseline
    (the detector scores against it), below the ratio at which a source without motion data
    is taken to be walking (HR x1.2)."""
    rr = codes == 0
    if not rr.any():
        return values
    v = values.copy()
    m = v[rr].mean()
    v[rr] = (m + 0.35 * (v[rr] - m)) / 1.15
    return v


class BatchMaker:
    """Cuts each user's next batch (beats up to 'now' on the sample clock) and encodes it."""

    def __init__(self, plan: Plan, templates: Templates, users: np.ndarray) -> None:
        self.plan = plan
        self.tp = templates
        self.users = users  # global indices this maker serves
        shifts = plan.shift_ns(plan.n_users)[users]
        self.shift = shifts + plan.day_shift_ns  # template time + shift = sample time
        self.tmpl = users % templates.count
        sample_t0 = int(plan.t0_wall * NS) + plan.offset_ns
        self.cursor = np.array(
            [templates.off[j] + np.searchsorted(self._times(j), sample_t0 - s, "left") for j, s in zip(self.tmpl, self.shift)],
            np.int64,
        )
        self.seq = np.zeros(len(users), np.int64)
        self.topics = [f"{plan.prefix}/ingest/{plan.user(int(i))}".encode() for i in users]
        self.stream_ids = [f"{plan.run_id}-{int(i)}" for i in users]

    def _times(self, j: int) -> np.ndarray:
        return self.tp.t[int(self.tp.off[j]) : int(self.tp.off[j + 1])]

    def make(self, local: int, now_wall_ns: int) -> tuple[bytes, bytes, int, int, int] | None:
        """(topic, payload, seq, newest sample ns, samples) for local user ``local``, or None
        when it has no new beat (a gap: a companion sends nothing)."""
        j = int(self.tmpl[local])
        cut = now_wall_ns + self.plan.offset_ns - int(self.shift[local])
        lo = int(self.cursor[local])
        hi = int(self.tp.off[j]) + int(np.searchsorted(self._times(j), cut, "right"))
        if hi <= lo:
            return None
        self.cursor[local] = hi
        t = self.tp.t[lo:hi] + self.shift[local]
        code = self.tp.code[lo:hi]
        value = self.tp.value[lo:hi]
        i = int(self.users[local])
        if self.plan.stressed(i):
            value = stress(value, code)
        seq = int(self.seq[local])
        self.seq[local] += 1
        user = self.plan.user(i)
        if self.plan.fmt == "binary":
            payload = wire.encode(user=user, stream_id=self.stream_ids[local], seq=seq, source="load/sim", time_ns=t,
                                  metric_code=code, value=value)  # fmt: skip
        else:
            payload = json.dumps(
                {"schema_version": 1, "user": user, "stream_id": self.stream_ids[local], "seq": seq, "source": "load/sim",
                 "time_ns": t.tolist(), "metric": [wire.METRICS[c] for c in code.tolist()], "value": value.tolist()},
                separators=(",", ":"),
            ).encode()  # fmt: skip
        return self.topics[local], payload, seq, int(t[-1]), hi - lo
