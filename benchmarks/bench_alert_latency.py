"""Decision-to-worker alert latency and sustained alert rate through a real Mosquitto.

    python benchmarks/bench_alert_latency.py [--rate 1000] [--n 5000] [--sustained-n 10000]

Starts its own Mosquitto (persistence on, as `broker.mosquitto_conf` writes it: autosave on
every change) on a free loopback port. The engine side is the real path: the dispatcher
records each detector decision in the SQLite outbox (WAL, one transaction per change), reads
the consent ledger and runs the gate immediately before the publish, publishes at QoS 1 with
a message expiry, and marks the delivery on PUBACK. The worker side is a paho subscriber in
the same process (one clock for both ends) with a persistent session.

1. Latency at a fixed offered rate (open loop, ``--rate`` decisions/s): time from handing the
   decision to the dispatcher to the worker's client receiving it; p50/p99/max.
2. Sustained rate: ``--sustained-n`` decisions as fast as the dispatcher takes them, handed
   over ``--batch`` at a time as one detector output is (one outbox transaction each);
   alerts/s until the worker received the last one (persistence on at both ends).

Reference in the same run: a bare paho publisher (QoS 1, same payload size, no outbox, no
gate) through the same broker, for both measurements, so broker and machine costs cancel.
"""

from __future__ import annotations

import argparse
import getpass
import json
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.lifecycle import EscalationPolicy
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.topics import Topics
from stresswatch.alerts.transport import MqttTransport, connect
from stresswatch.broker import free_port, mosquitto_conf
from stresswatch.consent.ledger import ConsentLedger
from stresswatch.model import AlertDecision, AlertLevel, Reason, alert_id_for

T0 = datetime(2026, 11, 25, tzinfo=timezone.utc)
TOPICS = Topics()


class Receiver:
    def __init__(self, url: str, worker: str) -> None:
        self.t: dict[str, float] = {}
        self.done = threading.Event()
        self.expect = 0
        self._lock = threading.Lock()
        self.client = connect(url, f"bench-{worker}", persistent_session=True, on_message=self._on)
        ok = threading.Event()
        self.client.on_subscribe = lambda *a: ok.set()
        self.client.subscribe(TOPICS.alerts(worker), qos=1)
        assert ok.wait(10)

    def _on(self, c, u, m) -> None:
        now = time.perf_counter()
        aid = json.loads(m.payload)["alert_id"]
        with self._lock:
            self.t.setdefault(aid, now)
            if self.expect and len(self.t) >= self.expect:
                self.done.set()

    def reset(self, expect: int) -> None:
        with self._lock:
            self.t.clear()
            self.expect = expect
            self.done.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def decisions(n: int, users: int, offset: int) -> list[AlertDecision]:
    out = []
    for i in range(n):
        start = T0 + timedelta(seconds=offset + i)
        user = f"u{i % users}"
        out.append(AlertDecision(alert_id_for(user, start), user, start, start, AlertLevel.ELEVATED, (Reason.HRV_BELOW_BASELINE,), 3.0))
    return out


def paced(n: int, rate: float, send) -> dict[int, float]:
    """Call send(i) at i/rate seconds (open loop); returns each call's start time."""
    sent: dict[int, float] = {}
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            if due - now > 0.002:
                time.sleep(due - now - 0.001)
        sent[i] = time.perf_counter()
        send(i)
    return sent


def stats(lat_s: list[float]) -> dict[str, float]:
    a = np.array(lat_s) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "n": len(a)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--sustained-n", type=int, default=10000)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50, help="decisions per detector output in the sustained run")
    ap.add_argument(
        "--autosave",
        choices=["changes", "interval"],
        default="changes",
        help="changes: the project's broker config (saves on every change: survives SIGKILL); "
        "interval: Mosquitto's own default (saves every 30 min), to see the broker's share",
    )
    args = ap.parse_args()
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    port = free_port()
    (tmp / "data").mkdir()
    conf = mosquitto_conf(port=port, data_dir=tmp / "data", allow_anonymous=True, run_as=getpass.getuser())
    if args.autosave == "interval":
        conf = conf.replace("autosave_on_changes true\n", "").replace("autosave_interval 1\n", "autosave_interval 1800\n")
    (tmp / "m.conf").write_text(conf)
    broker = subprocess.Popen([mosq, "-c", str(tmp / "m.conf")], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    url = f"mqtt://127.0.0.1:{port}"
    results: dict[str, object] = {}
    try:
        ledger = ConsentLedger(tmp / "state.sqlite")
        for u in range(args.users):
            ledger.grant(f"u{u}", ["sam"], now=T0)
        outbox = Outbox(tmp / "state.sqlite")
        transport = MqttTransport(url, client_id="bench-engine")
        disp = Dispatcher(
            outbox, ledger, transport, clock=lambda: datetime.now(timezone.utc), topics=TOPICS,
            policy=EscalationPolicy(cooldown_s=0), resend_after_s=30.0,
        )  # fmt: skip
        rx = Receiver(url, "sam")
        # warm-up
        rx.reset(200)
        for d in decisions(200, args.users, 10_000_000):
            disp.raise_alert(d)
        assert rx.done.wait(30)

        # 1. latency at a fixed rate, engine path
        ds = decisions(args.n, args.users, 0)
        rx.reset(args.n)
        sent = paced(args.n, args.rate, lambda i: disp.raise_alert(ds[i]))
        while not rx.done.wait(0.01):
            disp.pump()
        lat = [rx.t[ds[i].alert_id] - sent[i] for i in range(args.n)]
        results["engine_latency"] = stats(lat)
        disp.pump()

        # 1r. reference: bare paho at the same rate, same payload size
        sample = outbox.decision(ds[0].alert_id)
        from stresswatch.consent.gate import alert_wire, decide

        body = alert_wire(decide(ledger.state(sample.user), sample, datetime.now(timezone.utc)).payload)
        payload_len = len(body)
        raw = connect(url, "bench-raw")
        rx.reset(args.n)

        def raw_send(i: int) -> None:
            msg = json.dumps({"alert_id": f"ref-{i}", "pad": "x" * max(0, payload_len - 40)}).encode()
            raw.publish(TOPICS.alerts("sam"), msg, qos=1)

        sent = paced(args.n, args.rate, raw_send)
        assert rx.done.wait(60)
        results["reference_latency"] = stats([rx.t[f"ref-{i}"] - sent[i] for i in range(args.n)])

        # 2. sustained rate, engine path (persistence on: SQLite outbox + Mosquitto autosave)
        ds = decisions(args.sustained_n, args.users, 1_000_000)
        rx.reset(args.sustained_n)
        t = time.perf_counter()
        for k in range(0, len(ds), args.batch):  # as the engine does: one detector output at a time
            disp.raise_alerts(ds[k : k + args.batch])
        raised_s = time.perf_counter() - t
        while not rx.done.wait(0.01):
            disp.pump()
        total_s = time.perf_counter() - t
        disp.drain(30)
        results["engine_sustained"] = {
            "alerts": args.sustained_n,
            "alerts_per_s": args.sustained_n / total_s,
            "raise_only_per_s": args.sustained_n / raised_s,
            "delivered_marked": outbox.delivery_counts()["delivered"],
        }

        # 2r. reference: bare paho as fast as possible
        rx.reset(args.sustained_n)
        t = time.perf_counter()
        for i in range(args.sustained_n):
            raw.publish(TOPICS.alerts("sam"), json.dumps({"alert_id": f"ref2-{i}", "pad": "x" * max(0, payload_len - 40)}).encode(), qos=1)
        assert rx.done.wait(120)
        results["reference_sustained"] = {"alerts_per_s": args.sustained_n / (time.perf_counter() - t)}
        raw.disconnect()
        raw.loop_stop()
        rx.close()
        transport.close()
        outbox.close()
        ledger.close()
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = f"{platform.machine()} {platform.processor() or ''} Python {platform.python_version()}".strip()
    results["date"] = str(date.today())
    results["args"] = vars(args)
    results["payload_bytes"] = payload_len
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
