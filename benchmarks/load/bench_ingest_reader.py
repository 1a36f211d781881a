"""The engine's ingest client, paho against the bulk reader: CPU µs per message, same run.

    python benchmarks/load/bench_ingest_reader.py [--messages 20000] [--rounds 3]

Both sides run the engine's whole receive path, as ``Engine.start`` builds it
(``engine.intake.Intake``): the MQTT client, the wire boundary's decode and checks,
de-duplication, the ingest log (append, ``fdatasync`` per group) and the PUBACK plus the
confirmation to the companion after the sync; only the hand-over to the detector is a counter.
The messages are the same for both: 60-s binary batches of 70 beats (about 570 bytes, the load
harness's format), one per simulated user, published beforehand into a fresh ingest broker
(``mosquitto_conf(role="ingest")``) for the engine's persistent session, so each reader takes
the same backlog as fast as it can. Reported per reader: process CPU time (all threads) per
message, wall time, messages per socket read (bulk). The readers alternate, ``--rounds`` times;
the median round is reported.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mqttpub import RawPublisher  # noqa: E402

from stresswatch.alerts.topics import Topics  # noqa: E402
from stresswatch.broker import free_port, mosquitto_conf  # noqa: E402
from stresswatch.config import MqttSettings  # noqa: E402
from stresswatch.engine.intake import Intake  # noqa: E402
from stresswatch.ingest import IngestBatch  # noqa: E402
from stresswatch.model import Metric  # noqa: E402
from stresswatch.wire.limits import TimeWindow  # noqa: E402
from stresswatch.wire.rejections import Rejections  # noqa: E402

TOPICS = Topics()


def payloads(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    now_ns = time.time_ns()
    out = []
    for i in range(n):
        rr = rng.normal(850, 50, 70)
        t = now_ns - 120 * 10**9 + np.cumsum(rr * 1e6).astype(np.int64)
        user = f"u{i:07d}"
        b = IngestBatch(user=user, stream_id=f"bench-{seed}-{i}", seq=0, source="sim", time_ns=t.tolist(), metric=[Metric.RR_MS] * 70, value=np.round(rr, 1).tolist())
        out.append((TOPICS.ingest(user).encode(), b.encode_binary()))
    return out


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        (workdir / "data").mkdir()
        conf = workdir / "mosquitto.conf"
        conf.write_text(mosquitto_conf(port=self.port, data_dir=workdir / "data", allow_anonymous=True, run_as=getpass.getuser(), role="ingest"))
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def one(reader: str, msgs: list[tuple[bytes, bytes]], protocol: str) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"swreader-{reader}-"))
    broker = Broker(workdir)
    settings = MqttSettings(client_id="bench-engine", ingest_reader=reader)  # type: ignore[call-arg]
    try:
        # the engine's session exists (as after its first start); then the backlog is queued for it
        intake = Intake(workdir / "log0", TOPICS, lambda b, seq: None)
        intake.connect(broker.url, settings, protocol, clock=lambda: datetime.now(timezone.utc), window=TimeWindow(), rejections=Rejections())
        intake.close()
        pub = RawPublisher("127.0.0.1", broker.port, "bench-companions")
        for k in range(0, len(msgs), 1000):
            for topic, payload in msgs[k : k + 1000]:
                pub.queue(topic, payload)
            pub.flush()
        if not pub.wait_acks(300):
            raise RuntimeError("the broker did not take the backlog")
        pub.close()
        got = [0]
        done = threading.Event()

        def deliver(batch, seq) -> None:
            got[0] += 1
            if got[0] >= len(msgs):
                done.set()

        intake = Intake(workdir / "log", TOPICS, deliver)
        cpu0, t0 = time.process_time(), time.perf_counter()
        intake.connect(broker.url, settings, protocol, clock=lambda: datetime.now(timezone.utc), window=TimeWindow(), rejections=Rejections())
        if not done.wait(600):
            raise RuntimeError(f"{reader}: {got[0]} of {len(msgs)} delivered")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rx = intake.receiver
        reads = rx._bulk.reads if rx is not None and rx._bulk is not None else None  # noqa: SLF001 - a figure for the table
        groups = intake.log.synced_groups
        intake.close()
        return {"reader": reader, "cpu_us_per_msg": 1e6 * cpu / len(msgs), "wall_s": wall, "msgs_per_s": len(msgs) / wall,
                "msgs_per_read": len(msgs) / reads if reads else None, "msgs_per_sync": len(msgs) / max(1, groups)}  # fmt: skip
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--protocol", default="auto", choices=["auto", "5", "3.1.1"])
    a = ap.parse_args()
    load = os.getloadavg()
    print(f"# ingest readers, {datetime.now(timezone.utc).isoformat(timespec='seconds')}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} cores, {a.messages:,} messages, protocol {a.protocol}, {a.rounds} rounds (median)")  # fmt: skip
    msgs = payloads(a.messages, 1)
    rows: dict[str, list[dict]] = {"paho": [], "bulk": []}
    for r in range(a.rounds):
        for reader in ("paho", "bulk") if r % 2 == 0 else ("bulk", "paho"):
            res = one(reader, msgs, a.protocol)
            rows[reader].append(res)
            print(f"  round {r + 1} {reader}: {res['cpu_us_per_msg']:.0f} µs/msg CPU, {res['msgs_per_s']:,.0f} msgs/s", flush=True)
    print("| reader | CPU µs/msg (median) | all rounds | msgs/s (median) | msgs per socket read | msgs per fsync |")
    print("|---|---|---|---|---|---|")
    for reader, rs in rows.items():
        med = statistics.median(x["cpu_us_per_msg"] for x in rs)
        per_read = rs[0]["msgs_per_read"]
        each = ", ".join(f"{x['cpu_us_per_msg']:.0f}" for x in rs)
        rate = statistics.median(x["msgs_per_s"] for x in rs)
        per_sync = statistics.median(x["msgs_per_sync"] for x in rs)
        print(f"| {reader} | {med:.0f} | {each} | {rate:,.0f} | {f'{per_read:.1f}' if per_read else '-'} | {per_sync:.0f} |")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
