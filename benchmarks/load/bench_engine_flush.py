"""The engine's own work at N users, in one process, minute by minute, without brokers.

``python benchmarks/load/bench_engine_flush.py --users 100000 --minutes 7 [--profile out.prof]``

The real :class:`stresswatch.engine.Engine` jobs on its thread: each batch as the ingest
reader hands it over (binary payload decoded and checked, consent from the cache, the
ingest buffer), the flush every 0.5 s (one frame, detector, dispatcher with the durable
outbox, samples handed to the sample writer, status after the flush) and the tick every
``tick_s`` (advance, due alerts, status sweep), on a simulated clock that runs as fast as
the engine does. Users, data, consent and calibrated state are the load harness's
(``users.py``: every user's batch once per 60 s, phases spread evenly, every 101st user
stressed). What it leaves out: MQTT (receiving, PUBACK, alert publish: an in-memory
transport), the ingest log, the state save (``persist``), metrics. So it shows what the
engine thread costs per message and, minute by minute, what a 5-minute window boundary adds
on top, in seconds of engine-thread time per simulated minute (real time needs < 60 s).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from users import NS, BatchMaker, Plan, calibrate, detector_blob, load_templates, seed_consent  # noqa: E402

from stresswatch.alerts.dispatch import Dispatcher  # noqa: E402
from stresswatch.alerts.outbox import Outbox  # noqa: E402
from stresswatch.alerts.transport import MemoryTransport  # noqa: E402
from stresswatch.config import Settings  # noqa: E402
from stresswatch.consent.ledger import ConsentLedger  # noqa: E402
from stresswatch.detect import Detector  # noqa: E402
from stresswatch.engine import Engine  # noqa: E402
from stresswatch.engine.consent_cache import ConsentCache  # noqa: E402
from stresswatch.engine.persist import StatePersister  # noqa: E402
from stresswatch.engine.status import StatusPublisher  # noqa: E402
from stresswatch.pipeline import Pipeline  # noqa: E402
from stresswatch.store import SampleStore  # noqa: E402
from stresswatch.wire.ingest import decode_ingest  # noqa: E402


class SimClock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.ns / NS, tz=timezone.utc)


def build(n_users: int, state: Path, stressed_every: int, boundary_after_s: float) -> tuple[Engine, Plan, BatchMaker, SimClock, Detector]:
    settings = Settings.model_validate({"store": {"state_dir": str(state)}, "metrics": {"enabled": False}})
    det_settings = settings.detector
    templates, frame = load_templates()
    template = calibrate(frame, templates, det_settings)
    t0_wall = float(int(time.time()))
    plan = Plan.make(n_users, 60.0, det_settings.window_s, stressed_every, t0_wall, boundary_after_s, templates)
    clock = SimClock(int(t0_wall * NS))
    state.mkdir(parents=True, exist_ok=True)
    db = settings.store.db_path
    seed_consent(db, plan, [f"w{k}" for k in range(8)], clock())
    blob = detector_blob(template, templates, plan, det_settings)
    eng = Engine(settings, url="mqtt://127.0.0.1:1", clock=clock, state_dir=state)
    eng.ledger = ConsentLedger(db)
    eng.outbox = Outbox(db)
    eng.consent = ConsentCache(eng.ledger)
    eng.consent.begin_load()
    eng.consent.load(list(eng.ledger.iter_states()))
    eng.consent.end_load()
    eng.persister = StatePersister(db, eng.outbox, SampleStore(state) if settings.engine.keep_samples else None, today=lambda: clock().date())
    detector = Detector.from_bytes(blob, det_settings)
    eng.dispatcher = Dispatcher.from_settings(settings, eng.outbox, eng.ledger, MemoryTransport(), clock=clock)
    eng.pipeline = Pipeline(detector, eng.dispatcher)
    eng.status = StatusPublisher(eng.topics, eng.consent, lambda u: eng.pipeline.detector.baseline_ready(u), lambda t, b: None, quarantine=eng.quarantine)
    eng.status.announce(list(eng.consent.users.names), clock())
    maker = BatchMaker(plan, templates, np.arange(n_users))
    return eng, plan, maker, clock, detector


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_per_user(eng: Engine, n: int) -> dict[str, float]:
    """Bytes per user of what the engine holds, by part: the detector's arrays (state and the
    buffered rows of unfinished minutes and undecided windows) and the engine's per-user tables."""
    det = eng.pipeline.detector
    z = det._arrays()
    groups: dict[str, float] = defaultdict(float)
    for k, v in z.items():
        if k.startswith("bl_"):
            g = "baselines"
        elif k.startswith(("b_", "o_")):
            g = "buffered rows (unfinished minutes)"
        elif k.startswith("p_"):
            g = "reduced minutes (undecided windows)"
        elif k in ("users", "row_users"):
            g = "user names (arrays of the save)"
        else:
            g = "other detector state"
        groups[g] += v.nbytes / n
    return {k: round(v, 1) for k, v in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--minutes", type=float, default=7.0)
    ap.add_argument("--stressed-every", type=int, default=101)
    ap.add_argument("--boundary-after-s", type=float, default=150.0, help="first 5-min window boundary this far into the run")
    ap.add_argument("--profile", help="write a cProfile of the measured part here")
    ap.add_argument("--json", help="write the per-minute figures here")
    a = ap.parse_args()

    t_build = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sw-flush-") as tmp:
        eng, plan, maker, clock, detector = build(a.users, Path(tmp) / "state", a.stressed_every, a.boundary_after_s)
        print(f"built {a.users} users in {time.perf_counter() - t_build:.1f} s; RSS {rss_mb():.0f} MB", flush=True)
        flush_s, tick_s = eng.flush_s, eng.settings.engine.tick_s
        n = a.users
        phase_ns = (np.arange(n) * (60 * NS) // n).astype(np.int64)
        t0 = int(plan.t0_wall * NS)
        boundary_ns = (t0 + plan.offset_ns) // (plan.window_s * NS) * (plan.window_s * NS) + plan.window_s * NS - plan.offset_ns
        steps = int(a.minutes * 60 / flush_s)
        per_min: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        worst: list[tuple[float, int, str]] = []
        next_tick = t0 + int(tick_s * NS)
        k = 0  # next batch: cycle k // n, user k % n
        seq = 0
        prof = cProfile.Profile() if a.profile else None
        alerts0 = 0
        rss_peak = rss_mb()
        for step in range(1, steps + 1):
            now = t0 + int(step * flush_s * NS)
            clock.ns = now
            minute = (now - t0 - 1) // (60 * NS)
            payloads = []
            while True:
                due = t0 + (k // n) * 60 * NS + phase_ns[k % n]
                if due > now:
                    break
                out = maker.make(k % n, int(due))
                if out is not None:
                    payloads.append((out[0], out[1]))
                k += 1
            pm = per_min[int(minute)]
            if prof:
                prof.enable()
            c0 = time.process_time()
            for topic, payload in payloads:
                batch = decode_ingest(payload, topic=topic.decode())
                seq += 1
                eng._on_batch(batch, seq)
            c1 = time.process_time()
            eng.flush()
            c2 = time.process_time()
            ticked = now >= next_tick
            if ticked:
                next_tick += int(tick_s * NS)
                eng.tick()
            c3 = time.process_time()
            if prof:
                prof.disable()
            pm["messages"] += len(payloads)
            pm["ingest_s"] += c1 - c0
            pm["flush_s"] += c2 - c1
            pm["tick_s"] += c3 - c2
            pm["max_step_s"] = max(pm["max_step_s"], c3 - c0)
            worst.append((c3 - c0, step, f"min {minute} t-boundary {(now - boundary_ns) / NS:+.1f}s"))
            if step % 20 == 0:
                rss_peak = max(rss_peak, rss_mb())
        alerts = eng.dispatcher.stats.raised if hasattr(eng.dispatcher.stats, "raised") else None
        print(f"boundary (5-min) at {(boundary_ns - t0) / NS:.1f} s into the run; users {n}; alerts raised {alerts}; RSS peak {rss_peak:.0f} MB ({rss_peak * 1024 / n:.1f} KB/user)")
        print("minute | messages | ingest s | flush s | tick s | engine s/min | µs/msg | longest step s")
        tot_msgs = tot_s = 0.0
        for m in sorted(per_min):
            pm = per_min[m]
            s = pm["ingest_s"] + pm["flush_s"] + pm["tick_s"]
            tot_msgs += pm["messages"]
            tot_s += s
            print(f"{m} | {int(pm['messages'])} | {pm['ingest_s']:.2f} | {pm['flush_s']:.2f} | {pm['tick_s']:.2f} | {s:.2f} | {s / max(1, pm['messages']) * 1e6:.0f} | {pm['max_step_s']:.2f}")
        print(f"all | {int(tot_msgs)} | | | | {tot_s:.2f} | {tot_s / max(1, tot_msgs) * 1e6:.0f} |")
        worst.sort(reverse=True)
        print("longest steps:", "; ".join(f"{s:.2f} s ({where})" for s, _, where in worst[:5]))
        print("memory held per user (bytes):", json.dumps(memory_per_user(eng, n)))
        if a.json:
            Path(a.json).write_text(json.dumps({"users": n, "per_minute": per_min, "rss_peak_mb": rss_peak}, default=dict))
        if prof:
            prof.dump_stats(a.profile)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        eng.persister.close()


if __name__ == "__main__":
    main()
