"""Capacity of one engine as shipped, end to end: simulated users -> Mosquitto -> ``Engine`` -> workers.

    python benchmarks/load/run.py                           # the shipped configuration, N = 10k, 100k (~15 min)
    python benchmarks/load/run.py --users 3000 30000        # the same at other N
    python benchmarks/load/run.py --quick                   # 60-s windows, 10-s batches, N = 300, 3000 (a deviation)
    python benchmarks/load/run.py --users 100000 --profile  # the engine's hottest functions (yappi; slows it)
    python benchmarks/load/run.py --cluster --users 20000 --engines 1 2 --preload  # cluster mode (cluster.py)

**Defaults are the product's defaults.** For each N the harness writes the broker directory
exactly as ``stresswatch broker config`` does (same function, ``BrokerDir.write_config``:
two brokers, alerts and consent saved on every change and ingest saved every 60 s, one
password file and ACL; docs/BROKER.md), starts both, and provisions the engine and the
workers with ``broker add-*``'s function; the engine runs with ``Settings()`` defaults
(``engine.keep_samples`` on, production detector settings, metrics on) except for the
addresses (broker URL, state directory, a free metrics port). Every departure from that is
a flag, listed as a *deviation* in the header line, in each result and in its table row.
One thing the harness cannot avoid: the N simulated users share a few connections, so one
extra broker account (``swload``) may publish on every user's ingest topic; the ACL is
otherwise the generated one.

For each N: fresh Mosquitto brokers on free loopback ports, N consenting users whose detector
state is calibrated (a real detector's, tiled), the real engine in its own process
(``engine_proc.py``), 8 worker clients (each acknowledges every alert it gets, as a worker
would), then the users publish in real time, one batch per ``--batch-s`` each, spread evenly.

**Reconciliation** (``reconcile.py``). The harness reads the engine's counts where an
operator does, from its ``/metrics``: alerts raised, withheld, suppressed, published,
delivered (broker PUBACK) and acknowledged by a worker. After publishing stops and the
engine has processed every batch, it waits until every expected alert (raised minus
withheld and suppressed) reached a worker, or ``--deadline-s`` passes; what has not arrived
by then is lost. Latency (a worker's receipt minus the publish of the batch that completed
the deciding window) is taken over *all* expected alerts, a lost one counting as +inf.

It reports messages and samples per second; backlog (published, not yet processed) during
and at the end; real time or not; the reconciliation and latency; the longest ingest wait
(engine metric: a durable batch handed to the engine until the detector processed it);
state save times; engine CPU and RSS (per user); broker and publisher CPU; engine start;
restart to live: from the stop signal until the new process is healthy with nothing queued
(stop plus start: a deploy's downtime, or a crash's with ``--restart kill``). JSON to --out, Markdown rows on stdout.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from publisher import run_publisher  # noqa: E402
from reconcile import Receipt, reconcile  # noqa: E402
from users import NS, Plan, calibrate, detector_blob, load_templates, seed_consent  # noqa: E402

from stresswatch.alerts.outbox import Outbox  # noqa: E402
from stresswatch.alerts.worker import WorkerClient  # noqa: E402
from stresswatch.broker import free_port  # noqa: E402
from stresswatch.broker.accounts import Role  # noqa: E402
from stresswatch.broker.directory import BrokerDir  # noqa: E402
from stresswatch.config import DetectorSettings, Settings  # noqa: E402

ENGINE_ACCOUNT = "stresswatch-engine"
LOAD_ACCOUNT = "swload"
QUICK = dict(users=[300, 3000], window_s=60, batch_s=10.0, boundary_after_s=45.0, duration_s=58.0)
# Production detector settings (5-min windows). The first window boundary comes 210 s into the
# run (so the first window is covered enough to be scored: coverage ~0.56 > 0.5), then one
# batch interval for every user's deciding batch to arrive.
FULL = dict(users=[10_000, 100_000], window_s=DetectorSettings().window_s, batch_s=60.0, boundary_after_s=210.0, duration_s=280.0)


class Broker:
    """The generated broker (``stresswatch broker config``), with the run's accounts."""

    def __init__(self, workdir: Path, prefix: str, workers: list[str], autosave_s: float | None = None, single: bool = False) -> None:
        self.port = free_port()
        self.ingest_port = self.port if single else free_port()  # shipped: a separate ingest broker (docs/BROKER.md)
        d = BrokerDir(workdir / "broker")
        d.write_config(port=self.port, prefix=prefix, run_as=getpass.getuser(), ingest_port=self.ingest_port, ingest_broker=not single)
        self.passwords = {ENGINE_ACCOUNT: d.add(Role.ENGINE, ENGINE_ACCOUNT)}
        for w in workers:
            self.passwords[w] = d.add(Role.WORKER, w)
        self.passwords[LOAD_ACCOUNT] = d.add(Role.USER, LOAD_ACCOUNT)
        with open(d.acl, "a") as f:  # the harness's one addition: N simulated users share its connections
            f.write(f"\n# load harness: one account publishes for every simulated user\nuser {LOAD_ACCOUNT}\ntopic write {prefix}/ingest/+\n")
        if autosave_s is not None:  # a deviation: periodic saves instead of one after every change
            text = d.conf.read_text()
            assert "autosave_on_changes true\nautosave_interval 1\n" in text
            d.conf.write_text(text.replace("autosave_on_changes true\nautosave_interval 1\n", f"autosave_on_changes false\nautosave_interval {autosave_s:g}\n"))
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.log = open(workdir / "mosquitto.log", "wb")
        self.procs = [subprocess.Popen([exe, "-c", str(conf)], stderr=self.log) for conf in ([d.conf] if single else [d.conf, d.ingest_conf])]
        self.proc = self.procs[0]
        import socket

        deadline = time.monotonic() + 10
        for port in {self.port, self.ingest_port}:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break
                except OSError:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        raise RuntimeError("mosquitto did not start") from None
                    time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def ingest_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.ingest_port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.log.close()


class EngineEndpoint:
    """The engine's /metrics and /healthz, as an operator's scraper reads them."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def metrics(self) -> dict[str, float]:
        """``name`` or ``name{label=value,...}`` -> value; {} if the engine does not answer."""
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_live(self, proc: subprocess.Popen, out: Path, timeout_s: float = 900) -> float:
        """Seconds until the engine is healthy and has nothing queued (restored, subscribed,
        caught up with what was waiting)."""
        t0 = time.time()
        while True:
            if self.healthy() and self.metrics().get("stresswatch_engine_queue_jobs", 1) == 0:
                return time.time() - t0
            if proc.poll() is not None:
                raise RuntimeError(f"engine exited: {out.read_text()[-2000:]}")
            if time.time() - t0 > timeout_s:
                raise RuntimeError(f"engine not live in {timeout_s:.0f} s")
            time.sleep(0.2)


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


def _profile_summary(path: Path, top: int = 14) -> list[dict]:
    """The engine's functions with the most CPU (yappi, all threads): inclusive and self shares."""
    data = json.loads(path.read_text())
    rows = [r for r in data["functions"] if not r["function"].startswith(("_bootstrap", "run (threading", "<module>", "main (engine_proc"))]
    rows.sort(key=lambda r: -r["inclusive"])
    out = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows[:top]]
    by_self = sorted(data["functions"], key=lambda r: -r["self"])[:top]
    out.append({"top_self": [(r["function"], round(r["self"], 3)) for r in by_self], "threads": data["threads"]})
    return out


def bucket_quantile(m: dict[str, float], name: str, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` (what a dashboard's
    ``histogram_quantile`` can at best say), from scraped ``name_bucket{le=...}`` samples."""
    buckets = sorted((float(k.split("le=")[1].rstrip("}")), v) for k, v in m.items() if k.startswith(f"{name}_bucket{{"))
    total = m.get(f"{name}_count", 0)
    if not total:
        return None
    return next((le for le, c in buckets if c >= q * total), math.inf)


def default_stressed_every(n_users: int, n_templates: int) -> int:
    """About 1 % of users stressed (at least 20), every k-th with k coprime to the number of
    templates, so the stressed users replay every template (every 100th user of 8 templates
    fell on two, whose data at some hours raised few alerts)."""
    k = max(1, min(101, n_users // 20))
    while k > 1 and math.gcd(k, n_templates) != 1:
        k -= 1
    return k


def deviations(a: argparse.Namespace) -> list[str]:
    """Every way this run departs from the shipped configuration (empty: as shipped)."""
    out = []
    if not a.keep_samples:
        out.append("--no-keep-samples (engine.keep_samples off)")
    if a.broker_autosave_s is not None:
        out.append(f"--broker-autosave-s {a.broker_autosave_s:g} (alerts broker saves every {a.broker_autosave_s:g} s, not on every change)")
    if a.single_broker:
        out.append("--single-broker (no separate ingest broker: ingest through the broker that saves on every change)")
    if a.window_s != DetectorSettings().window_s:
        out.append(f"--window-s {a.window_s} (detector; {DetectorSettings().window_s} shipped)")
    if a.persist_s is not None:
        out.append(f"--persist-s {a.persist_s:g} (engine.persist_s)")
    if a.protocol != "auto":
        out.append(f"--protocol {a.protocol} (mqtt.protocol)")
    if "SWLOAD_FLUSH_S" in os.environ:
        out.append(f"SWLOAD_FLUSH_S={os.environ['SWLOAD_FLUSH_S']} (engine flush interval)")
    if a.profile:
        out.append("--profile (yappi slows the engine)")
    return out


def _start_engine(workdir: Path, name: str, prof_path: Path | None) -> subprocess.Popen:
    out = workdir / f"{name}.out"
    return subprocess.Popen(
        [sys.executable, str(HERE / "engine_proc.py"), str(workdir / "settings.json")] + ([str(prof_path)] if prof_path else []),
        stdout=open(out, "wb"),
        stderr=subprocess.STDOUT,
    )


def _stop_engine(engine: subprocess.Popen, timeout_s: float = 300, sig: int = signal.SIGTERM) -> float:
    t0 = time.time()
    if engine.poll() is None:
        engine.send_signal(sig)
        try:
            engine.wait(timeout_s)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
    return time.time() - t0


def run_one(n_users: int, a: argparse.Namespace, templates, template_frame, det_settings: DetectorSettings) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"swload-{n_users}-"))
    state = workdir / "state"
    state.mkdir()
    workers = [f"w{k}" for k in range(a.workers)]
    defaults = Settings()
    broker = Broker(workdir, defaults.mqtt.prefix, workers, a.broker_autosave_s, a.single_broker)
    res: dict = {"users": n_users, "batch_s": a.batch_s, "window_s": det_settings.window_s, "format": a.format, "deviations": deviations(a)}
    engine: subprocess.Popen | None = None
    clients: list[WorkerClient] = []
    procs: list[mp.Process] = []
    try:
        metrics_port = free_port()
        engine_section: dict = {}
        if not a.keep_samples:
            engine_section["keep_samples"] = False
        if a.persist_s is not None:
            engine_section["persist_s"] = a.persist_s
        settings = Settings.model_validate(
            {
                "mqtt": {"url": broker.url, "ingest_url": broker.ingest_url, "username": ENGINE_ACCOUNT, "password": broker.passwords[ENGINE_ACCOUNT], "protocol": a.protocol},
                "detector": det_settings.model_dump(),
                "store": {"state_dir": str(state)},
                "engine": engine_section,
                "metrics": {"port": metrics_port},
            }
        )
        (workdir / "settings.json").write_text(settings.model_dump_json())
        ep = EngineEndpoint(metrics_port)
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

        prof_path = workdir / "profile.json" if a.profile else None
        engine = _start_engine(workdir, "engine", prof_path)
        eproc = psutil.Process(engine.pid)
        bprocs = [psutil.Process(p.pid) for p in broker.procs]
        res["engine_start_s"] = round(ep.wait_live(engine, workdir / "engine.out", a.live_timeout_s), 1)
        res["engine_rss_idle_mb"] = round(_rss(eproc) / 2**20, 1)

        receipts: list[tuple[str, int, str, int]] = []  # (alert_id, receipt ns, user, raised_at ns)
        lock = threading.Lock()
        acks: queue.Queue[tuple[WorkerClient, str] | None] = queue.Queue()

        def on_alert_for(client_ref: list[WorkerClient]):
            def on_alert(alert) -> None:
                t = time.time_ns()
                with lock:
                    receipts.append((alert.alert_id, t, alert.user, int(alert.raised_at.timestamp() * NS)))
                acks.put((client_ref[0], alert.alert_id))  # acknowledged off paho's thread (ack waits for its PUBACK)

            return on_alert

        def acker() -> None:
            while (item := acks.get()) is not None:
                try:
                    item[0].ack(item[1])
                except Exception:  # noqa: BLE001 - an ack that fails shows as a missing acknowledgement
                    pass

        ack_thread = threading.Thread(target=acker, name="acks", daemon=True)
        ack_thread.start()
        for w in workers:
            ref: list[WorkerClient] = []
            ref.append(WorkerClient(broker.url, w, on_alert_for(ref), username=w, password=broker.passwords[w]))
            clients.append(ref[0])

        t0 = time.time() + 1.0
        plan = Plan.make(n_users, a.batch_s, det_settings.window_s, a.stressed_every, t0, a.boundary_after_s, templates, a.format)
        stop_wall = t0 + a.duration_s
        ctx = mp.get_context("fork")
        shared = [(ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False), ctx.Value("q", 0, lock=False)) for _ in range(a.publishers)]
        logs = [workdir / f"publisher{p}.npz" for p in range(a.publishers)]
        creds = (LOAD_ACCOUNT, broker.passwords[LOAD_ACCOUNT])
        for p in range(a.publishers):
            proc = ctx.Process(
                target=run_publisher,
                args=(plan, templates, p, a.publishers, a.connections, "127.0.0.1", broker.ingest_port, creds, stop_wall, str(logs[p]), *shared[p]),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        pprocs = [psutil.Process(p.pid) for p in procs]
        if a.profile:
            engine.send_signal(signal.SIGUSR1)

        series = []
        steady_from = t0 + a.batch_s  # the first cycle starts users mid-interval: not steady yet
        mark = None
        while time.time() < stop_wall:
            time.sleep(1.0)
            m = ep.metrics()
            row = {
                "t": round(time.time() - t0, 1),
                "sent": sum(s[0].value for s in shared),
                "acked": sum(s[1].value for s in shared),
                "processed": int(m.get("stresswatch_ingest_batches_total", 0)),
                "queue": int(m.get("stresswatch_engine_queue_jobs", 0)),
                "engine_cpu": _cpu(eproc),
                "broker_cpu": sum(_cpu(p) for p in bprocs),  # both brokers
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
        while ep.metrics().get("stresswatch_ingest_batches_total", 0) < total_sent and time.time() - t_drain < a.drain_s:
            time.sleep(0.25)
        t_drained = time.time()
        res["drain_s"] = round(t_drained - t_drain, 1)

        # -- reconciliation: wait for every expected alert, or the deadline ---------------
        deadline = t_drained + a.deadline_s
        while True:
            m = ep.metrics()
            expected = m.get("stresswatch_alerts_raised_total", 0) - m.get("stresswatch_alerts_withheld_total", 0) - m.get("stresswatch_alerts_suppressed_total", 0)
            with lock:
                arrived = len({r[0] for r in receipts})
            done = arrived >= expected and m.get("stresswatch_alerts_acknowledged_total", 0) >= expected and m.get("stresswatch_engine_queue_jobs", 1) == 0
            if done or time.time() >= deadline:
                break
            time.sleep(0.25)
        res["reconcile_wait_s"] = round(time.time() - t_drained, 1)
        final = ep.metrics()
        if a.profile:
            engine.send_signal(signal.SIGUSR2)
            t_p = time.time() + 30
            while prof_path is not None and not prof_path.exists() and time.time() < t_p:
                time.sleep(0.2)
            time.sleep(0.5)
            if prof_path is not None and prof_path.exists():
                res["profile"] = _profile_summary(prof_path)

        # -- figures ---------------------------------------------------------------------
        (ta, ra), (tb, rb) = mark or (series[0]["t"] + t0, series[0]), end
        span = tb - ta
        msgs = rb["sent"] - ra["sent"]
        log = {k: np.concatenate([np.load(p)[k] for p in logs if p.exists()]) for k in ("user", "seq", "wall_ns", "tmax_ns", "samples", "bytes")}
        res["published"] = int(total_sent)
        res["processed"] = int(final.get("stresswatch_ingest_batches_total", 0))
        res["processed_pct"] = round(100.0 * res["processed"] / max(1, total_sent), 1)  # by the end of the wait for alerts
        res["rejected"] = int(sum(v for k, v in final.items() if k.startswith("stresswatch_messages_rejected_total")))
        res["dropped_no_consent"] = int(final.get("stresswatch_ingest_batches_dropped_total{reason=no_consent}", 0))
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
        res["ingest_wait_max_s"] = round(final.get("stresswatch_ingest_wait_max_seconds", float("nan")), 2)
        saves = final.get("stresswatch_state_save_seconds_count", 0)
        res["state_saves"] = int(saves)
        res["state_save_mean_s"] = round(final.get("stresswatch_state_save_seconds_sum", 0) / saves, 2) if saves else None
        res["engine_delivery_p99_le_s"] = bucket_quantile(final, "stresswatch_alert_delivery_seconds", 0.99)
        for k in ("published", "republished", "delivered", "acknowledged", "undeliverable"):
            res[f"engine_alerts_{k}"] = int(final.get(f"stresswatch_alerts_{k}_total", 0))
        # latency: worker receipt - publish of the first batch of that user whose newest
        # sample reached the window end (the batch that let the window finish)
        order = np.lexsort((log["seq"], log["user"]))
        lu, lt, lw = log["user"][order], log["tmax_ns"][order], log["wall_ns"][order]
        with lock:
            got = list(receipts)
        rec = []
        for alert_id, t_recv, user, raised_ns in got:
            i = int(user[1:])
            lo, hi = np.searchsorted(lu, i, "left"), np.searchsorted(lu, i, "right")
            hit = np.flatnonzero(lt[lo:hi] >= raised_ns)
            rec.append(Receipt(alert_id, t_recv / NS, (t_recv - int(lw[lo + hit[0]])) / NS if len(hit) else None))
        r = reconcile(
            raised=int(final.get("stresswatch_alerts_raised_total", 0)),
            withheld=int(final.get("stresswatch_alerts_withheld_total", 0)),
            suppressed=int(final.get("stresswatch_alerts_suppressed_total", 0)),
            receipts=rec,
            deadline_s=deadline,
        )
        res.update({f"alerts_{k}" if not k.startswith(("latency", "reconciled")) else k: v for k, v in r.summary().items()})
        res["stressed_users"] = len([i for i in range(n_users) if plan.stressed(i)])
        res["series"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()} for row in series]

        # -- restart to live: stop (SIGTERM: state saved; SIGKILL: a crash), start again ----
        if a.restart:
            res["restart_after"] = a.restart
            res["engine_stop_s"] = round(_stop_engine(engine, sig=signal.SIGKILL if a.restart == "kill" else signal.SIGTERM), 1)
            engine = _start_engine(workdir, "engine-restart", None)
            try:
                res["restart_start_s"] = round(ep.wait_live(engine, workdir / "engine-restart.out", a.live_timeout_s), 1)
                res["restart_to_live_s"] = round(res["engine_stop_s"] + res["restart_start_s"], 1)  # the downtime: stop, then start
            except RuntimeError as exc:  # a figure too: not live in time
                res["restart_to_live_s"] = f"> {res['engine_stop_s'] + a.live_timeout_s:.0f} ({exc})"
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
        if engine is not None:
            _stop_engine(engine, 180)
        broker.stop()
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            res["workdir"] = str(workdir)


COLUMNS = [
    ("users", "users"),
    ("sustained", "real time"),
    ("msgs_per_s", "msgs/s"),
    ("backlog_end_s", "backlog end s"),
    ("backlog_max_s", "backlog max s"),
    ("processed_pct", "processed %"),
    ("stressed_users", "stressed users"),
    ("alerts_raised", "raised"),
    ("alerts_delivered", "delivered"),
    ("alerts_lost", "lost"),
    ("alerts_duplicates", "dup"),
    ("latency_p50_s", "latency p50 s (all raised)"),
    ("latency_p99_s", "latency p99 s (all raised)"),
    ("ingest_wait_max_s", "longest ingest wait s"),
    ("engine_rss_kb_per_user", "RSS KB/user"),
    ("engine_rss_max_mb", "engine RSS MB"),
    ("engine_cpu_cores", "engine CPU"),
    ("engine_cpu_us_per_msg", "engine µs/msg"),
    ("broker_cpu_cores", "broker CPU"),
    ("state_save_mean_s", "state save s"),
    ("engine_start_s", "start s"),
    ("restart_to_live_s", "restart to live s"),
    ("loadavg_after", "load avg 1/5/15"),
    ("deviations", "deviations"),
]


def _cell(v) -> str:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "; ".join(v) or "none (as shipped)"
    if isinstance(v, list):
        return " / ".join(str(x) for x in v)
    return "" if v is None else str(v)


def table(results: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    rows = ["| " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in results]
    return "\n".join([head, sep, *rows])


def main(argv: list[str] | None = None) -> None:
    if "--cluster" in (argv if argv is not None else sys.argv[1:]):  # cluster mode: its own module, cluster.py
        from cluster import main as cluster_main

        raise SystemExit(cluster_main([x for x in (argv if argv is not None else sys.argv[1:]) if x != "--cluster"]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60-s windows (a deviation), 10-s batches, N = 300 and 3000 (~2 min)")
    ap.add_argument("--users", type=int, nargs="+", help="the N to run, in order")
    ap.add_argument("--batch-s", type=float, help="each user's batch interval (s); a workload choice (60 s recommended to companions)")
    ap.add_argument("--duration-s", type=float, help="publishing time per N (s)")
    ap.add_argument("--window-s", type=int, help="detector window (s); a deviation unless the shipped 300")
    ap.add_argument("--boundary-after-s", type=float, help="first window boundary this long into the run")
    ap.add_argument("--format", choices=["binary", "json"], default="binary", help="the companions' payload format (workload)")
    ap.add_argument("--publishers", type=int, default=1, help="publisher processes (at most one per core)")
    ap.add_argument("--connections", type=int, default=4, help="MQTT connections per publisher process")
    ap.add_argument("--workers", type=int, default=8, help="support-worker clients (users are spread over them)")
    ap.add_argument("--stressed-every", type=int, default=0, help="every k-th user is stressed (default: ~1 %%, at least 20 users, k coprime to the templates)")
    ap.add_argument("--no-keep-samples", dest="keep_samples", action="store_false", help="deviation: engine.keep_samples off")
    ap.add_argument("--persist-s", type=float, help="deviation: engine.persist_s")
    ap.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto", help="the engine's mqtt.protocol (auto is shipped)")
    ap.add_argument("--broker-autosave-s", type=float, help="deviation: the alerts broker saves every S s instead of after every change")
    ap.add_argument("--single-broker", action="store_true", help="deviation: no separate ingest broker (broker config --single-broker)")
    ap.add_argument("--profile", action="store_true", help="profile the engine's threads during the run (yappi; slows it)")
    ap.add_argument("--stop-after-failure", action="store_true", help="stop the series at the first N not sustained")
    ap.add_argument("--drain-s", type=float, default=120.0, help="after publishing, wait this long at most for the engine to process everything")
    ap.add_argument("--deadline-s", type=float, default=60.0, help="an alert not at its worker this long after the engine processed everything is lost")
    ap.add_argument(
        "--restart",
        choices=["term", "kill", "none"],
        default="term",
        help="after the run, stop the engine with SIGTERM (a deploy) or SIGKILL (a crash) and time its start to live; none skips it",
    )
    ap.add_argument("--live-timeout-s", type=float, default=900.0, help="an engine (re)start not live (healthy, nothing queued) by then is reported as such")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (logs, state)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/load/results"))
    a = ap.parse_args(argv)
    a.restart = None if a.restart == "none" else a.restart
    base = QUICK if a.quick else FULL
    a.users = a.users or base["users"]
    for key in ("batch_s", "duration_s", "window_s", "boundary_after_s"):
        if getattr(a, key) is None:
            setattr(a, key, base[key])
    det = DetectorSettings(window_s=a.window_s)
    templates, frame = load_templates()
    a.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    dev = deviations(a)
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "loadavg_before": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "deviations": dev,
    }
    print(
        f"# load run {meta['date']}  load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}  "
        f"deviations: {'; '.join(dev) if dev else 'none (as shipped)'}  "
        f"| workload: {a.format}, batch {a.batch_s:g} s, window {a.window_s} s, deadline {a.deadline_s:g} s, "
        f"{a.publishers}x{a.connections} connections on one load account, restart after {a.restart or 'none'}",
        flush=True,
    )
    results = []
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = a.out / f"load_{'quick' if a.quick else 'full'}_{stamp}.json"
    for n in a.users:
        a_n = argparse.Namespace(**vars(a))
        a_n.stressed_every = a.stressed_every or default_stressed_every(n, templates.count)
        t = time.time()
        try:
            r = run_one(n, a_n, templates, frame, det)
        except (RuntimeError, OSError) as exc:  # this N failed (said so); the series goes on
            r = {"users": n, "error": str(exc)[-500:], "sustained": False, "deviations": dev}
        r["wall_s"] = round(time.time() - t, 1)
        r["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        results.append(r)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))  # after each N: a later failure keeps it
        print(table([r]).splitlines()[-1] if len(results) > 1 else table([r]), flush=True)
        if not r.get("reconciled"):
            print(f"    NOT RECONCILED: {json.dumps({k: v for k, v in r.items() if k.startswith('alerts_')})}", flush=True)
        if "profile" in r:
            for p in r["profile"][:-1]:
                print(f"    {p['inclusive']:6.1%} incl {p['self']:6.1%} self  {p['function']}")
        if a.stop_after_failure and not r["sustained"]:
            break
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
