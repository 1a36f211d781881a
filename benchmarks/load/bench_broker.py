"""Messages per second each generated broker configuration sustains (QoS 1, as ingest uses it).

    python benchmarks/load/bench_broker.py                       # both shipped roles, steps up to 8,000/s
    python benchmarks/load/bench_broker.py --retained 200000     # a store holding 200,000 retained messages

For each configuration a fresh Mosquitto starts on a free loopback port with the file
``stresswatch.broker.mosquitto_conf`` writes (``--role alerts``: store saved after every change,
the alerts-and-consent broker; ``--role ingest``: saved every 60 s, the ingest broker; plus,
for reference, the old harness setting ``every-1s`` and ``persistence-off``; every deviation
from a shipped role is named in the row). An engine-like subscriber holds a persistent session
on ``ingest/+`` and acknowledges each message at once, followed by the QoS 0 confirmation the
engine publishes (:class:`stresswatch.mqtt_bulk.BulkSubscriber`); one raw publisher
(``mqttpub.RawPublisher``) sends 430-byte QoS 1 batches (the load harness's mean) at each
rate for ``--step-s`` seconds, spread evenly. A rate is *sustained* when the broker acknowledged
and delivered at least 97 % of it within the step and the rest within 1 s after it. Steps stop
at the first rate not sustained.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqttpub import RawPublisher  # noqa: E402

from stresswatch.broker import free_port, mosquitto_conf  # noqa: E402
from stresswatch.mqtt_bulk import BulkSubscriber  # noqa: E402
from stresswatch.mqtt_packets import publish as publish_packet  # noqa: E402

CONFIGS = {
    "alerts": ("alerts", None),  # shipped: the alerts-and-consent broker
    "ingest": ("ingest", None),  # shipped: the ingest broker
    "every-1s": ("alerts", ("autosave_on_changes true\nautosave_interval 1\n", "autosave_on_changes false\nautosave_interval 1\n")),
    "persistence-off": ("ingest", ("persistence true\n", "persistence false\n")),
}


class Broker:
    def __init__(self, config: str) -> None:
        role, change = CONFIGS[config]
        self.dir = Path(tempfile.mkdtemp(prefix=f"swbroker-{config}-"))
        (self.dir / "data").mkdir()
        self.port = free_port()
        text = mosquitto_conf(port=self.port, data_dir=self.dir / "data", allow_anonymous=True, run_as=getpass.getuser(), role=role)  # type: ignore[arg-type]
        if change is not None:
            assert change[0] in text
            text = text.replace(*change)
        (self.dir / "mosquitto.conf").write_text(text)
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.dir / "mosquitto.conf")], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)


class EngineLike:
    """Subscribes like the engine's bulk reader and acknowledges (plus a confirmation) at once."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self.sub = BulkSubscriber(f"mqtt://127.0.0.1:{port}", "bench-engine", "sw/ingest/+", self._got, protocol="3.1.1").start()

    def _got(self, publishes, generation: int) -> None:
        for p in publishes:
            self.sub.ack(p.packet_id, generation, publish_packet("sw/ingested/" + p.topic.rpartition("/")[2], b"\x00" * 16))
        self.sub.flush_acks()
        with self._lock:
            self.count += len(publishes)


def preload_retained(port: int, n: int) -> None:
    """``n`` retained QoS 1 messages, as the engine's per-user status (and companions' consent) leave."""
    pub = RawPublisher("127.0.0.1", port, "bench-retained")
    for i in range(n):
        pub.queue(f"sw/status/u{i:07d}".encode(), b'{"status":"active"}', retain=True)
        if i % 1000 == 999:
            pub.flush()
    pub.flush()
    if not pub.wait_acks(1800):
        raise RuntimeError("the broker did not take the retained messages")
    pub.close()


def step(broker: Broker, eng: EngineLike, pub: RawPublisher, rate: int, step_s: float, payload: bytes) -> dict:
    sent0, acked0, got0, cpu0 = pub.sent, pub.acked, eng.count, broker.cpu_s()
    n = int(rate * step_s)
    t0 = time.monotonic()
    tick_s = 0.01
    done = 0
    while done < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        for i in range(done, due):
            pub.queue(b"sw/ingest/u%07d" % (i % 100000), payload)
        done = due
        pub.flush()
        time.sleep(tick_s)
    in_step_s = time.monotonic() - t0
    pub.poll()
    acked_in, got_in = pub.acked - acked0, eng.count - got0
    deadline = time.monotonic() + 1.0
    while (pub.acked - acked0 < n or eng.count - got0 < n) and time.monotonic() < deadline:
        pub.poll()
        time.sleep(0.01)
    cpu = broker.cpu_s() - cpu0
    ok = acked_in >= 0.97 * n and got_in >= 0.97 * n and pub.acked - acked0 >= n and eng.count - got0 >= n
    row = {"rate": rate, "sent": pub.sent - sent0, "acked_per_s": round(acked_in / in_step_s), "delivered_per_s": round(got_in / in_step_s),
           "broker_cpu": round(cpu / (time.monotonic() - t0), 2), "sustained": ok}  # fmt: skip
    if not ok:  # let the broker catch up before the next configuration
        pub.wait_acks(120)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rates", nargs="+", type=int, default=[250, 500, 1000, 2000, 4000, 8000])
    ap.add_argument("--step-s", type=float, default=4.0)
    ap.add_argument("--payload-bytes", type=int, default=430)
    ap.add_argument("--retained", type=int, default=0, help="retained messages in the broker's store before the steps")
    a = ap.parse_args()
    payload = os.urandom(a.payload_bytes)
    load = os.getloadavg()
    print(f"# broker configurations, {datetime.now(timezone.utc).isoformat(timespec='seconds')}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} cores, QoS 1, {a.payload_bytes}-byte payloads, {a.step_s:g}-s steps, {a.retained} retained messages in the store")  # fmt: skip
    print("| configuration | offered msgs/s | acknowledged msgs/s | delivered msgs/s | broker CPU (cores) | sustained |")
    print("|---|---|---|---|---|---|")
    for config in a.configs:
        broker = Broker(config)
        try:
            if a.retained:
                preload_retained(broker.port, a.retained)
            eng = EngineLike(broker.port)
            pub = RawPublisher("127.0.0.1", broker.port, "bench-publisher")
            best = 0
            for rate in a.rates:
                r = step(broker, eng, pub, rate, a.step_s, payload)
                print(f"| {config} | {rate:,} | {r['acked_per_s']:,} | {r['delivered_per_s']:,} | {r['broker_cpu']} | {'yes' if r['sustained'] else 'no'} |", flush=True)
                if not r["sustained"]:
                    break
                best = rate
            print(f"| **{config}: sustains** | **{best:,}** | | | | |", flush=True)
            pub.close()
            eng.sub.close()
        finally:
            broker.stop()
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
