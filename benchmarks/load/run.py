"""Capacity of one engine, end to end: simulated users -> Mosquitto -> ``Engine`` -> workers.

    python benchmarks/load/run.py --quick          # ~2 min: 60-s windows, 10-s batches, N = 300, 3000
    python benchmarks/load/run.py                  # ~15 min: 5-min windows, 60-s batches, N = 30k, 100k, 150k
    python benchmarks/load/run.py --users 100000 --batch-s 30 --profile
    python benchmarks/load/run.py --quick --users 3000 --crash-safe-broker

For each N the harness starts its own Mosquitto on a free loopback port (the project's
generated configuration, ``stresswatch.broker.mosquitto_conf``, except that it saves its
store once a second instead of after every change, which caps ingest at a few hundred
messages/s: ``--crash-safe-broker`` keeps it; docs/SCALING.md), seeds N consenting,
calibrated users, runs the real engine in its own process (``engine_proc.py``), connects
the support workers (``WorkerClient``), and then the users publish in real time, one batch
per ``--batch-s`` each, from ``--publishers`` processes over a few connections each.

It reports: messages and samples per second; backlog (batches published but not yet
processed by the engine) during and at the end of the run; whether N was sustained in real
time (end backlog <= 2 s of traffic and the publishers kept their schedule); alert latency
(a worker's receipt minus the publish time of the batch that completed the deciding
window); engine CPU (cores) and resident memory (total and per user); broker and publisher
CPU; with ``--profile`` the engine's hottest functions (yappi). Results go to --out as
JSON, plus a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import getpass
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from publisher import run_publisher  # noqa: E402
from users import NS, Plan, calibrate, detector_blob, load_templates, seed_consent  # noqa: E402

from stresswatch.alerts.outbox import Outbox  # noqa: E402
from stresswatch.alerts.worker import WorkerClient  # noqa: E402
from stresswatch.broker import free_port, mosquitto_conf  # noqa: E402
from stresswatch.config import DetectorSettings, Settings  # noqa: E402

QUICK = dict(users=[300, 3000], window_s=60, batch_s=10.0, boundary_after_s=45.0, duration_s=58.0)
# Production detector settings (5-min windows). The first window boundary comes 210 s into the
# run (so the first window is covered enough to be scored: coverage ~0.56 > 0.5), then one
# batch interval for every user's deciding batch to arrive.
FULL = dict(users=[30_000, 100_000, 150_000], window_s=300, batch_s=60.0, boundary_after_s=210.0, duration_s=280.0)


class Broker:
    def __init__(self, workdir: Path, autosave_s: float | None = None) -> None:
        self.port = free_port()
        data = workdir / "mosquitto"
        data.mkdir()
        conf = workdir / "mosquitto.conf"
        text = mosquitto_conf(port=self.port, data_dir=data, allow_anonymous=True, run_as=getpass.getuser())
        if autosave_s is not None:  # instead of a full save after every change: once per autosave_s seconds
            assert "autosave_on_changes true\nautosave_interval 1\n" in text
            text = text.replace("autosave_on_changes true\nautosave_interval 1\n", f"autosave_on_changes false\nautosave_interval {autosave_s:g}\n")
        conf.write_text(text)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stderr=self.log)
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _last_stats(path: Path) -> dict:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def _cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def engine_profile_start(engine: subprocess.Popen) -> None:
    engine.send_signal(signal.SIGUSR1)


def _profile_summary(path: Path, top: int = 14) -> list[dict]:
    """The engine's functions with the most CPU (yappi, all threads): inclusive and self shares."""
    data = json.loads(path.read_text())
    rows = [r for r in data["functions"] if not r["function"].startswith(("_bootstrap", "run (threading", "<module>", "main (engine_proc"))]
    rows.sort(key=lambda r: -r["inclusive"])
    out = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:top]]
    by_self = sorted(data["functions"], key=lambda r: -r["self"])[:top]
    out.append({"top_self": [(r["function"], round(r["self"], 3)) for r in by_self], "threads": data["threads"]})
    return out


def run_one(n_users: int, a: argparse.Namespace, templates, template_frame, det_settings: DetectorSettings) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"swload-{n_users}-"))
    state = workdir / "state"
    state.mkdir()
    broker = Broker(workdir, a.broker_autosave_s)
    workers = [f"w{k}" for k in range(a.workers)]
    res: dict = {"users": n_users, "batch_s": a.batch_s, "window_s": det_settings.window_s, "format": a.format,
                 "protocol": a.protocol, "broker_autosave": f"every {a.broker_autosave_s:g} s" if a.broker_autosave_s else "every change"}  # fmt: skip
    engine = None
    clients: list[WorkerClient] = []
    procs: list[mp.Process] = []
    try:
        settings = Settings.model_validate(
            {
                "mqtt": {"url": broker.url, "client_id": "swload-engine", "protocol": a.protocol},
                "detector": det_settings.model_dump(),
                "store": {"state_dir": str(state)},
                "engine": {"keep_samples": a.keep_samples, **({"persist_s": a.persist_s} if a.persist_s else {})},
            }
        )
        (workdir / "settings.json").write_text(settings.model_dump_json())
        t_seed = time.time()
        template = calibrate(template_frame, templates, det_settings)
        est_t0 = time.time() + 30 + n_users / 2000
        plan = Plan.make(n_users, a.batch_s, det_settings.window_s, a.stressed_every, est_t0, a.boundary_after_s, templates, a.format)
        now = datetime.now(timezone.utc)
        seed_consent(settings.store.db_path, plan, workers, now)
        blob = detector_blob(template, templates, plan, det_settings)
        ob = Outbox(settings.store.db_path)
        ob.save_detector(blob, now)
        ob.close()
        res["seed_s"] = round(time.time() - t_seed, 1)
        res["detector_blob_bytes_per_user"] = round(len(blob) / n_users)

        stats_path = workdir / "engine_stats.jsonl"
        t_start = time.time()
        prof_path = workdir / "profile.json"
        engine = subprocess.Popen(
            [sys.executable, str(HERE / "engine_proc.py"), str(workdir / "settings.json"), str(state), broker.url, str(stats_path)]
            + ([str(prof_path)] if a.profile else []),
            stdout=open(workdir / "engine.out", "wb"),
            stderr=subprocess.STDOUT,
        )
        eproc = psutil.Process(engine.pid)
        bproc = psutil.Process(broker.proc.pid)
        while True:
            st = _last_stats(stats_path)
            if st.get("ready") and st.get("queue") == 0:
                break
            if engine.poll() is not None:
                raise RuntimeError(f"engine exited: {(workdir / 'engine.out').read_text()[-2000:]}")
            if time.time() - t_start > 900:
                raise RuntimeError("engine did not become ready in 15 min")
            time.sleep(0.2)
        res["engine_start_s"] = round(time.time() - t_start, 1)
        res["engine_rss_idle_mb"] = round(_rss(eproc) / 2**20, 1)

        received: list[tuple[int, str, int]] = []
        lock = threading.Lock()

        def on_alert(alert) -> None:
            t = time.time_ns()
            with lock:
                received.append((t, alert.user, int(alert.raised_at.timestamp() * NS)))

        for w in workers:
            clients.append(WorkerClient(broker.url, w, on_alert, client_id=f"swload-{w}"))

        t0 = time.time() + 1.0
        plan = Plan.make(n_users, a.batch_s, det_settings.window_s, a.stressed_every, t0, a.boundary_after_s, templates, a.format)
        stop_wall = t0 + a.duration_s
        ctx = mp.get_context("fork")
        shared = [(ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)) for _ in range(a.publishers)]
        logs = [workdir / f"publisher{p}.npz" for p in range(a.publishers)]
        for p in range(a.publishers):
            proc = ctx.Process(
                target=run_publisher,
                args=(plan, templates, p, a.publishers, a.connections, "127.0.0.1", broker.port, stop_wall, str(logs[p]), *shared[p]),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        pprocs = [psutil.Process(p.pid) for p in procs]

        if a.profile:
            engine_profile_start(engine)

        series = []
        steady_from = t0 + a.batch_s  # the first cycle starts users mid-interval: not steady yet
        mark = None
        while time.time() < stop_wall:
            time.sleep(1.0)
            st = _last_stats(stats_path)
            sent = sum(s[0].value for s in shared)
            row = {
                "t": round(time.time() - t0, 1),
                "sent": sent,
                "acked": sum(s[1].value for s in shared),
                "processed": st.get("batches", 0),
                "queue": st.get("queue", 0),
                "engine_cpu": _cpu(eproc),
                "broker_cpu": _cpu(bproc),
                "pub_cpu": sum(_cpu(p) for p in pprocs),
                "rss": _rss(eproc),
                "pub_lag_ms": max(s[2].value for s in shared),
            }
            series.append(row)
            if mark is None and time.time() >= steady_from:
                mark = (time.time(), row)
        end = (time.time(), series[-1])
        t_drain = time.time()
        for p in procs:
            p.join(120)  # each waits for the broker's PUBACKs of all it sent
        total_sent = sum(s[0].value for s in shared)
        # drain: how long after the last publish until the engine has processed everything
        while _last_stats(stats_path).get("batches", 0) < total_sent and time.time() - t_drain < a.drain_s:
            time.sleep(0.25)
        res["drain_s"] = round(time.time() - t_drain, 1)
        st = _last_stats(stats_path)
        time.sleep(2.0)  # the last alerts' delivery
        if a.profile:
            engine.send_signal(signal.SIGUSR2)
            deadline = time.time() + 30
            while not prof_path.exists() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)
            if prof_path.exists():
                res["profile"] = _profile_summary(prof_path)

        # -- figures ---------------------------------------------------------------------
        (ta, ra), (tb, rb) = mark or (series[0]["t"] + t0, series[0]), end
        span = tb - ta
        msgs = rb["sent"] - ra["sent"]
        log = {k: np.concatenate([np.load(p)[k] for p in logs if p.exists()]) for k in ("user", "seq", "wall_ns", "tmax_ns", "samples", "bytes")}
        res["published"] = int(total_sent)
        res["processed"] = int(st.get("batches", 0))
        res["rejected"] = st.get("rejected")
        res["dropped_no_consent"] = st.get("dropped")
        res["msgs_per_s"] = round(msgs / span, 1)
        res["samples_per_s"] = round(float(log["samples"][log["wall_ns"] >= ta * NS].sum()) / max(1e-9, (stop_wall - ta)), 1)
        res["bytes_per_msg"] = round(float(log["bytes"].mean()), 1) if len(log["bytes"]) else None
        res["samples_per_msg"] = round(float(log["samples"].mean()), 1) if len(log["samples"]) else None
        backlog = [r["sent"] - r["processed"] for r in series if r["t"] >= a.batch_s]
        rate = max(1.0, msgs / span)
        res["backlog_max_s"] = round(max(backlog) / rate, 2) if backlog else None
        res["backlog_end_s"] = round(backlog[-1] / rate, 2) if backlog else None
        res["publisher_lag_max_s"] = round(max(r["pub_lag_ms"] for r in series) / 1000, 2)
        res["sustained"] = bool(
            backlog and backlog[-1] / rate <= 2.0 and res["publisher_lag_max_s"] <= 1.0 and res["processed"] >= total_sent
        )
        res["engine_cpu_cores"] = round((rb["engine_cpu"] - ra["engine_cpu"]) / span, 3)
        res["broker_cpu_cores"] = round((rb["broker_cpu"] - ra["broker_cpu"]) / span, 3)
        res["publisher_cpu_cores"] = round((rb["pub_cpu"] - ra["pub_cpu"]) / span, 3)
        res["engine_cpu_us_per_msg"] = round(1e6 * (rb["engine_cpu"] - ra["engine_cpu"]) / max(1, msgs), 1)
        res["engine_rss_max_mb"] = round(max(r["rss"] for r in series) / 2**20, 1)
        res["engine_rss_end_mb"] = round(series[-1]["rss"] / 2**20, 1)
        res["engine_rss_kb_per_user"] = round(max(r["rss"] for r in series) / 1024 / n_users, 2)
        # alert latency: worker receipt - publish of the first batch of that user whose newest
        # sample reached the window end (the batch that let the window finish)
        lat = []
        order = np.lexsort((log["seq"], log["user"]))
        lu, lt, lw = log["user"][order], log["tmax_ns"][order], log["wall_ns"][order]
        unmatched = 0
        with lock:
            got = list(received)
        for t_recv, user, raised_ns in got:
            i = int(user[1:])
            lo, hi = np.searchsorted(lu, i, "left"), np.searchsorted(lu, i, "right")
            hit = np.flatnonzero(lt[lo:hi] >= raised_ns)
            if not len(hit):
                unmatched += 1
                continue
            lat.append((t_recv - int(lw[lo + hit[0]])) / NS)
        res["alerts"] = len(got)
        res["alerts_unmatched"] = unmatched
        res["stressed_users"] = len([i for i in range(n_users) if plan.stressed(i)])
        if lat:
            la = np.array(lat)
            res["latency_p50_s"] = round(float(np.percentile(la, 50)), 3)
            res["latency_p99_s"] = round(float(np.percentile(la, 99)), 3)
            res["latency_max_s"] = round(float(la.max()), 3)
        res["series"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in series]
        return res
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - tearing down
                pass
        if engine is not None and engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(180)
            except subprocess.TimeoutExpired:
                engine.kill()
        broker.stop()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            res["workdir"] = str(workdir)


COLUMNS = [
    ("users", "users"),
    ("msgs_per_s", "msgs/s"),
    ("samples_per_s", "samples/s"),
    ("bytes_per_msg", "B/msg"),
    ("sustained", "real time"),
    ("backlog_end_s", "backlog end s"),
    ("backlog_max_s", "backlog max s"),
    ("drain_s", "drain s"),
    ("alerts", "alerts"),
    ("latency_p50_s", "latency p50 s"),
    ("latency_p99_s", "latency p99 s"),
    ("engine_cpu_cores", "engine CPU"),
    ("engine_cpu_us_per_msg", "engine µs/msg"),
    ("engine_rss_max_mb", "engine RSS MB"),
    ("engine_rss_kb_per_user", "RSS KB/user"),
    ("broker_cpu_cores", "broker CPU"),
    ("publisher_cpu_cores", "publisher CPU"),
    ("engine_start_s", "engine start s"),
    ("loadavg_after", "load avg 1/5/15 min"),
]


def table(results: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    rows = ["| " + " | ".join(str(r.get(k, "")) for k, _ in COLUMNS) + " |" for r in results]
    return "\n".join([head, sep, *rows])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60-s windows, 10-s batches, N = 300 and 3000 (~2 min)")
    ap.add_argument("--users", type=int, nargs="+", help="the N to run, in order")
    ap.add_argument("--batch-s", type=float, help="each user's batch interval (s)")
    ap.add_argument("--duration-s", type=float, help="publishing time per N (s)")
    ap.add_argument("--window-s", type=int, help="detector window (s); 300 is production")
    ap.add_argument("--boundary-after-s", type=float, help="first window boundary this long into the run")
    ap.add_argument("--format", choices=["binary", "json"], default="binary")
    ap.add_argument("--publishers", type=int, default=1, help="publisher processes (at most one per core)")
    ap.add_argument("--connections", type=int, default=4, help="MQTT connections per publisher process")
    ap.add_argument("--workers", type=int, default=8, help="support-worker clients (users are spread over them)")
    ap.add_argument("--stressed-every", type=int, default=0, help="every k-th user is stressed (default: ~1 %%, at least 20 users)")
    ap.add_argument("--keep-samples", action="store_true", help="engine.keep_samples (Parquet store); off by default here")
    ap.add_argument("--profile", action="store_true", help="profile the engine's threads during the run (yappi; slows it)")
    ap.add_argument("--stop-after-failure", action="store_true", help="stop the series at the first N not sustained")
    ap.add_argument("--drain-s", type=float, default=60.0)
    ap.add_argument("--persist-s", type=float, help="engine.persist_s (default: the engine's, 60 s)")
    ap.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto", help="the engine's mqtt.protocol")
    ap.add_argument("--broker-autosave-s", type=float, default=1.0, help="Mosquitto saves its store every S seconds (default 1)")
    ap.add_argument("--crash-safe-broker", action="store_true", help="the generated config unchanged: save after every change")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (logs, stats)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/load/results"))
    a = ap.parse_args(argv)
    if a.crash_safe_broker:
        a.broker_autosave_s = None
    base = QUICK if a.quick else FULL
    a.users = a.users or base["users"]
    for key in ("batch_s", "duration_s", "window_s", "boundary_after_s"):
        if getattr(a, key) is None:
            setattr(a, key, base[key])
    det = DetectorSettings(window_s=a.window_s)
    templates, frame = load_templates()
    a.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "loadavg_before": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(f"# load run {meta['date']}  load average {load[0]:.2f}  ({a.format}, batch {a.batch_s:g} s, window {a.window_s} s)", flush=True)
    results = []
    for n in a.users:
        stressed_every = a.stressed_every
        a_n = argparse.Namespace(**vars(a))
        a_n.stressed_every = stressed_every or max(1, min(100, n // 20))
        t = time.time()
        r = run_one(n, a_n, templates, frame, det)
        r["wall_s"] = round(time.time() - t, 1)
        r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        results.append(r)
        print(table([r]).splitlines()[-1] if len(results) > 1 else table([r]), flush=True)
        if "profile" in r:
            for p in r["profile"][:-1]:
                print(f"    {p['inclusive']:6.1%} incl {p['self']:6.1%} self  {p['function']}")
        if a.stop_after_failure and not r["sustained"]:
            break
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = a.out / f"load_{'quick' if a.quick else 'full'}_{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
