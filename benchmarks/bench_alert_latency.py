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


class Mosquitto:
    """A fresh broker (own data dir) per measurement, so one phase's persistence file does not
    slow the next."""

    def __init__(self, autosave: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
        self.port = free_port()
        (self.tmp / "data").mkdir()
        conf = mosquitto_conf(port=self.port, data_dir=self.tmp / "data", allow_anonymous=True, run_as=getpass.getuser())
        if autosave == "interval":
            conf = conf.replace("autosave_on_changes true\n", "").replace("autosave_interval 1\n", "autosave_interval 1800\n")
        (self.tmp / "m.conf").write_text(conf)
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.tmp / "m.conf")], stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        self.url = f"mqtt://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def engine_phase(args: argparse.Namespace, sustained: bool) -> dict[str, float]:
    """The real path: outbox (SQLite) -> gate (ledger read) -> MQTT -> worker client."""
    broker = Mosquitto(args.autosave)
    state = Path(tempfile.mkdtemp(prefix="bench-state-"))
    try:
        ledger = ConsentLedger(state / "state.sqlite")
        for u in range(args.users):
            ledger.grant(f"u{u}", ["sam"], now=T0)
        outbox = Outbox(state / "state.sqlite")
        transport = MqttTransport(broker.url, client_id="bench-engine")
        disp = Dispatcher(
            outbox, ledger, transport, clock=lambda: datetime.now(timezone.utc), topics=TOPICS,
            policy=EscalationPolicy(cooldown_s=0), resend_after_s=30.0,
        )  # fmt: skip
        rx = Receiver(broker.url, "sam")
        rx.reset(200)  # warm-up
        for d in decisions(200, args.users, 10_000_000):
            disp.raise_alert(d)
        assert rx.done.wait(60)
        if not sustained:
            ds = decisions(args.n, args.users, 0)
            rx.reset(args.n)
            sent = paced(args.n, args.rate, lambda i: disp.raise_alert(ds[i]))
            while not rx.done.wait(0.01):
                disp.pump()
            result = stats([rx.t[ds[i].alert_id] - sent[i] for i in range(args.n)])
            result["offered_per_s"] = (args.n - 1) / (sent[args.n - 1] - sent[0])  # achieved, not asked
        else:
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
            result = {
                "alerts": args.sustained_n,
                "alerts_per_s": args.sustained_n / total_s,
                "raise_only_per_s": args.sustained_n / raised_s,
                "all_marked_delivered": outbox.delivery_counts()["pending"] == 0,
            }
        rx.close()
        transport.close()
        outbox.close()
        ledger.close()
        return result
    finally:
        broker.close()
        shutil.rmtree(state, ignore_errors=True)


def reference_phase(args: argparse.Namespace, sustained: bool, payload_len: int) -> dict[str, float]:
    """A bare paho publisher, QoS 1, same payload size: no outbox, no gate."""
    broker = Mosquitto(args.autosave)
    try:
        rx = Receiver(broker.url, "sam")
        raw = connect(broker.url, "bench-raw")
        pad = "x" * max(0, payload_len - 40)

        def send(tag: str) -> None:
            raw.publish(TOPICS.alerts("sam"), json.dumps({"alert_id": tag, "pad": pad}).encode(), qos=1)

        rx.reset(200)
        for i in range(200):
            send(f"warm-{i}")
        assert rx.done.wait(60)
        if not sustained:
            rx.reset(args.n)
            sent = paced(args.n, args.rate, lambda i: send(f"ref-{i}"))
            assert rx.done.wait(120)
            result = stats([rx.t[f"ref-{i}"] - sent[i] for i in range(args.n)])
            result["offered_per_s"] = (args.n - 1) / (sent[args.n - 1] - sent[0])
        else:
            rx.reset(args.sustained_n)
            t = time.perf_counter()
            for i in range(args.sustained_n):
                send(f"ref2-{i}")
            assert rx.done.wait(300)
            result = {"alerts_per_s": args.sustained_n / (time.perf_counter() - t)}
        raw.disconnect()
        raw.loop_stop()
        rx.close()
        return result
    finally:
        broker.close()


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
    sample = decisions(1, 1, 0)[0]
    from stresswatch.consent.gate import alert_wire, decide
    from stresswatch.consent.state import ConsentState, Status

    st = ConsentState(sample.user, Status.ACTIVE, ("sam",), display_name="peer-000000")
    payload_len = len(alert_wire(decide(st, sample, T0).payload))  # type: ignore[arg-type]
    results: dict[str, object] = {
        "reference_latency": reference_phase(args, False, payload_len),
        "engine_latency": engine_phase(args, False),
        "reference_sustained": reference_phase(args, True, payload_len),
        "engine_sustained": engine_phase(args, True),
    }
    results["machine"] = f"{platform.machine()} Python {platform.python_version()}"
    results["date"] = str(date.today())
    results["args"] = vars(args)
    results["payload_bytes"] = payload_len
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
