"""The companions' two paths into a cluster, measured in the same run on the same NATS cluster:

  (a) bridge: companions -> Mosquitto (the generated ingest broker) -> `stresswatch cluster bridge`
      -> JetStream (PUBACK to Mosquitto after JetStream's acknowledgement);
  (b) nats-mqtt: companions -> NATS's own MQTT listener -> subject mapping by partition()
      -> JetStream (`cluster.companions = "nats-mqtt"`, `stresswatch cluster nats-conf`).

    python benchmarks/load/companions_path.py                      # 30,000 batches per path, 4 MQTT connections
    python benchmarks/load/companions_path.py --batches 60000 --kill-test 5000

Same streams (16 partitions, replication 3 on a 3-node nats-server cluster started here on
free loopback ports), same binary 60-beat payloads, same MQTT 3.1.1 QoS 1 publishers (raw
sockets: `mqttpub.py`, up to 30,000 PUBACKs outstanding per connection), spread over the
NATS nodes' listeners for (b). For each path: messages/s until the publishers had every PUBACK,
messages/s until the stream held every batch, and the CPU of the nats-server processes, the
bridge and Mosquitto over that time (utime + stime from /proc/<pid>/stat).

`--kill-test M`: when the PUBACK is sent, tested. M more batches are published; as soon as the
last PUBACK arrives every broker-side process of the path is killed with SIGKILL (a: Mosquitto,
the bridge and the three nats-servers; b: the three nats-servers), restarted on the same
stores, and the batches found in the stream are counted: a batch acknowledged to its
companion and not in the stream was lost.

Deviations from a production deployment, printed: both brokers anonymous on loopback (no
per-user ACL, no TLS); everything on one shared machine.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import batches, uptime, wait  # noqa: E402
from mqttpub import RawPublisher  # noqa: E402
from nats_cluster import NatsCluster, start_cluster  # noqa: E402

from stresswatch.broker import free_port, mosquitto_conf  # noqa: E402
from stresswatch.cluster.jetstream import JetStreamIO, open_ready  # noqa: E402
from stresswatch.cluster.layout import Layout  # noqa: E402
from stresswatch.config import Settings  # noqa: E402

DEVIATIONS = ["brokers anonymous on loopback (no per-user ACL, no TLS)"]
TICK_S = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pids: list[int]) -> float:
    """utime + stime of ``pids`` from /proc (0 for a process that is gone)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK_S  # fields 14 and 15 of stat(5)
    return total


def stream_count(jsio: JetStreamIO, stream: str) -> int:
    return int(jsio.call(jsio.js.stream_info(stream)).state.messages)


def publish(ports: list[int], items: list[tuple[str, int, bytes]], prefix: str, tag: str) -> float:
    """Publish every item over one raw MQTT 3.1.1 connection per port (round robin), QoS 1;
    seconds until every PUBACK arrived."""
    pubs = [RawPublisher("127.0.0.1", port, f"{tag}-{i}-{uuid.uuid4().hex[:6]}", timeout_s=30) for i, port in enumerate(ports)]
    t0 = time.monotonic()
    for i, (user, _seq, payload) in enumerate(items):
        pubs[i % len(pubs)].queue(f"{prefix}/ingest/{user}".encode(), payload)
        if i % 500 == 499:
            for p in pubs:
                p.flush()
    for p in pubs:
        p.flush()
    for p in pubs:
        if not p.wait_acks(600):
            raise RuntimeError(f"{tag}: PUBACKs missing ({p.acked} of {p.sent})")
    took = time.monotonic() - t0
    for p in pubs:
        p.close()
    return took


class _Process:
    """A child process this benchmark started: SIGKILL, or SIGTERM with ``stop_wait_s`` to exit."""

    proc: subprocess.Popen[bytes] | None = None
    stop_wait_s = 10.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.kill()


class Bridge(_Process):
    """`stresswatch cluster bridge` as its own process (its CPU is measured apart)."""

    stop_wait_s = 30.0  # it drains its in-flight publishes to JetStream first

    def __init__(self, config: Path, cluster: NatsCluster, mqtt_url: str, log: Path) -> None:
        self.args = [sys.executable, "-m", "stresswatch.cli", "--config", str(config), "cluster", "bridge", "--cluster", cluster.url, "--broker", mqtt_url]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


class Mosquitto(_Process):
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        (work / "mq").mkdir()
        self.conf = work / "mosquitto.conf"
        # the generated ingest broker's settings (role "ingest": its store saved every 60 s)
        self.conf.write_text(mosquitto_conf(port=self.port, data_dir=work / "mq", allow_anonymous=True, run_as=getpass.getuser(), role="ingest"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)


def measure(path: str, cluster: NatsCluster, jsio: JetStreamIO, stream: str, ports: list[int], pids: list[int], items: list[tuple[str, int, bytes]], prefix: str) -> dict[str, object]:
    before = stream_count(jsio, stream)
    nats_pids = [n.proc.pid for n in cluster.nodes if n.proc]
    cpu0 = {"nats": proc_cpu_s(nats_pids), "others": proc_cpu_s(pids)}
    t0 = time.monotonic()
    t_ack = publish(ports, items, prefix, path)
    at_ack = stream_count(jsio, stream) - before  # stored when the last PUBACK arrived
    assert wait(lambda: stream_count(jsio, stream) - before >= len(items), 900, 0.2), f"{path}: the stream did not get every batch"
    t_all = time.monotonic() - t0
    cpu = {"nats": proc_cpu_s(nats_pids) - cpu0["nats"], "others": proc_cpu_s(pids) - cpu0["others"]}
    n = len(items)
    return {
        "path": path, "batches": n, "stored": stream_count(jsio, stream) - before, "stored_at_last_puback": at_ack, "pubacks_s": round(t_ack, 1), "stored_s": round(t_all, 1),
        "acked_per_s": round(n / t_ack), "stored_per_s": round(n / t_all),
        "nats_cpu_s": round(cpu["nats"], 1), "bridge_mosquitto_cpu_s": round(cpu["others"], 1),
        "nats_us_per_batch": round(cpu["nats"] / n * 1e6), "bridge_mosquitto_us_per_batch": round(cpu["others"] / n * 1e6),
        "total_broker_side_us_per_batch": round((cpu["nats"] + cpu["others"]) / n * 1e6), "uptime": uptime(),
    }  # fmt: skip


def restart_nats(cluster: NatsCluster) -> None:
    for node in cluster.nodes:
        node.kill()
    for node in cluster.nodes:
        node.start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=30_000, help="batches per path")
    ap.add_argument("--connections", type=int, default=4, help="MQTT publisher connections per path")
    ap.add_argument("--kill-test", type=int, default=0, metavar="M", help="then publish M batches per path and kill the brokers at the last PUBACK")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    print(f"# companions' path: {args.batches} batches per path, {args.connections} MQTT 3.1.1 QoS 1 connections; deviations: {'; '.join(DEVIATIONS)}")
    print(f"# machine: {os.cpu_count()} cores, shared with other work; load average at start: {uptime()}", flush=True)
    settings = Settings()
    c = settings.cluster
    prefix = settings.mqtt.prefix
    work = Path(tempfile.mkdtemp(prefix="swpath-"))
    lay_b = Layout(partitions=c.partitions, replicas=c.replicas, name="pb")  # bridge
    lay_m = Layout(partitions=c.partitions, replicas=c.replicas, name="pm", user_token=True)  # NATS's MQTT listener
    cluster = start_cluster(work / "nats", 3, mqtt_layout=lay_m)
    mosq = Mosquitto(work)
    mosq.start()
    cfg = work / "bridge.toml"
    cfg.write_text(f'[mqtt]\nurl = "mqtt://127.0.0.1:{mosq.port}"\nclient_id = "bench-bridge"\n[cluster]\nname = "pb"\n')
    bridge = Bridge(cfg, cluster, f"mqtt://127.0.0.1:{mosq.port}", work / "bridge.log")
    n_users = max(1, args.batches // 5)
    rounds = -(-args.batches // n_users)
    items = batches(n_users, rounds)[: args.batches]
    # later batches never repeat a (user, stream, seq) of the measured ones (both the bridge and
    # JetStream drop a repeat)
    warm = batches(1, rounds + 2, seed=9)[-1:]
    rows: list[dict[str, object]] = []
    jsio_b = open_ready(cluster.urls, lay_b, name="bench-b", retention_s=86_400)
    jsio_m = open_ready(cluster.urls, lay_m, name="bench-m", retention_s=86_400)
    bridge.start()
    try:
        mports = [n.mqtt_port for n in cluster.nodes]
        # warm up both paths (the bridge's session, NATS's MQTT streams) with one batch each
        for port, jsio, stream in ((mosq.port, jsio_b, lay_b.stream), (mports[0], jsio_m, lay_m.stream)):
            for _ in range(60):  # until the bridge has subscribed / the listener's streams exist
                publish([port], warm, prefix, "warm")
                if wait(lambda: stream_count(jsio, stream) >= 1, 2, 0.2):  # noqa: B023 - used at once
                    break
            else:
                raise RuntimeError(f"no warm-up batch reached {stream}: {(work / 'bridge.log').read_text()[-2000:]}")
        assert bridge.proc is not None and mosq.proc is not None
        rows.append(measure("a: Mosquitto + bridge", cluster, jsio_b, lay_b.stream, [mosq.port] * args.connections, [mosq.proc.pid, bridge.proc.pid], items, prefix))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(measure("b: NATS MQTT listener", cluster, jsio_m, lay_m.stream, [mports[i % 3] for i in range(args.connections)], [], items, prefix))
        print(json.dumps(rows[-1]), flush=True)
        kills: list[dict[str, object]] = []
        if args.kill_test:
            extra = batches(args.kill_test, rounds + 1, seed=7)[-args.kill_test:]
            # (a): kill Mosquitto, the bridge and every NATS server at the last PUBACK
            before = stream_count(jsio_b, lay_b.stream)
            publish([mosq.port] * args.connections, extra, prefix, "kill-a")
            mosq.kill()
            bridge.kill()
            restart_nats(cluster)
            mosq.start()
            bridge.start()
            jsio_b.close()
            jsio_b = open_ready(cluster.urls, lay_b, name="bench-b2", retention_s=86_400)
            wait(lambda: stream_count(jsio_b, lay_b.stream) - before >= args.kill_test, 60, 1.0)
            kills.append({"path": "a", "acked": args.kill_test, "in_stream": stream_count(jsio_b, lay_b.stream) - before})
            print(json.dumps(kills[-1]), flush=True)
            # (b): kill every NATS server at the last PUBACK
            jsio_m.close()
            jsio_m = open_ready(cluster.urls, lay_m, name="bench-m2", retention_s=86_400)
            before = stream_count(jsio_m, lay_m.stream)
            mports = [n.mqtt_port for n in cluster.nodes]
            publish([mports[i % 3] for i in range(args.connections)], extra, prefix, "kill-b")
            restart_nats(cluster)
            jsio_m.close()
            jsio_m = open_ready(cluster.urls, lay_m, name="bench-m3", retention_s=86_400)
            wait(lambda: stream_count(jsio_m, lay_m.stream) - before >= args.kill_test, 60, 1.0)
            kills.append({"path": "b", "acked": args.kill_test, "in_stream": stream_count(jsio_m, lay_m.stream) - before})
            print(json.dumps(kills[-1]), flush=True)
    finally:
        bridge.stop()
        mosq.stop()
        for j in (jsio_b, jsio_m):
            try:
                j.close()
            except Exception:  # noqa: BLE001 - closing after a kill
                pass
        cluster.stop()
    if args.out:
        args.out.write_text(json.dumps({"deviations": DEVIATIONS, "rows": rows, "kills": kills}, indent=1))
    print(f"\ndeviations: {'; '.join(DEVIATIONS)}")
    print("| path | batches | in the stream at the last PUBACK | all PUBACKs s | all stored s | acked/s | stored/s | nats-server CPU s | bridge + Mosquitto CPU s | broker side µs/batch | load avg (uptime, after the row) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['batches']:,} | {r['stored_at_last_puback']:,} | {r['pubacks_s']} | {r['stored_s']} | {r['acked_per_s']:,} | {r['stored_per_s']:,} | {r['nats_cpu_s']} | {r['bridge_mosquitto_cpu_s']} | {r['total_broker_side_us_per_batch']} | {r['uptime']} |")
    for k in kills:
        print(f"kill at the last PUBACK, path {k['path']}: {k['acked']} acknowledged, {k['in_stream']} in the stream after the restart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
