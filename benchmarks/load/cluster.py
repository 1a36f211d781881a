"""Cluster mode's cost and scale-out: K `stresswatch engine --cluster` processes draining the
same ingest from a 3-node NATS JetStream cluster (replication 3), then one engine killed.

    python benchmarks/load/cluster.py                          # N = 20,000 users x 5 batches, K = 1 then 2
    python benchmarks/load/cluster.py --users 50000 --engines 1 2 3
    python benchmarks/load/run.py --cluster [same options]     # the same, from the load harness
    python benchmarks/load/cluster.py --preload --engines 1 2 3 --nats-nodes 1 --replicas 1   # engines' scale-out apart from NATS

`--nats-nodes 1 --replicas 1` (a deviation, printed beside every figure) runs one NATS server
without replication: on a 2-core machine the three replicating servers take most of the CPU,
which hides the engines' own scale-out factor.

For each K, on a fresh namespace of one cluster started here (three nats-server processes on
free loopback ports, their own store directories; Mosquitto on a free port for alerts):

1. consent granted for N users (the consent bucket); K engines started with the product's
   defaults (`Settings()`, 16 partitions, replicas 3, lease TTL 10 s, snapshots every 60 s),
   addresses and the namespace aside; they share the partitions;
2. N x B ingest batches published into the stream as the bridge does (one per user per
   60 s of data, 60 beats each, binary), acknowledged by JetStream, while the engines pull;
3. measured until every partition's consumer has nothing pending: messages per second of
   wall time, **engine CPU seconds per message** (psutil, every engine process) and the NATS
   servers' CPU, load average. Without `--preload` from the first publish; with `--preload`
   (a backlog) from the moment the K engines share the partitions, over the messages still
   pending then (start-up and lease hand-over are reported apart, `startup_s`);
4. with K >= 2: one engine killed (SIGKILL) while one more round is published; **takeover time**
   = until every partition is owned again, and until nothing is pending.

Deviations from a production run, printed in the header: the users' detector state starts
empty (no calibrated baselines: the learning path, whose cost per window is the same
vectorised update), ingest is published by this process straight into JetStream (the
bridge's job) rather than through Mosquitto, and Mosquitto (alerts only) is anonymous on
loopback. The reference for the single engine's cost per message through paho is the load
harness's own figure (`benchmarks/RESULTS.md`, "Capacity"), not re-measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from nats_cluster import start_cluster  # noqa: E402

from stresswatch.broker import free_port, mosquitto_conf  # noqa: E402
from stresswatch.cluster.jetstream import JetStreamIO, open_ready  # noqa: E402
from stresswatch.cluster.layout import Layout, partition_of  # noqa: E402
from stresswatch.cluster.publish import ingest_headers  # noqa: E402
from stresswatch.config import Settings  # noqa: E402
from stresswatch.consent.state import Action, ConsentEvent  # noqa: E402
from stresswatch.wire import binary  # noqa: E402
from stresswatch.wire.consent import encode_consent  # noqa: E402

DEVIATIONS = ["detector state starts empty", "ingest published straight into JetStream (no bridge)", "alerts broker anonymous on loopback"]


def batches(n_users: int, n_batches: int, seed: int = 1) -> list[tuple[str, int, bytes]]:
    """(user, seq, binary payload): 60 beats per batch (one a second), RR around 1 s."""
    rng = np.random.default_rng(seed)
    start_ns = (int(time.time()) // 60 - n_batches - 2) * 60 * 10**9
    out = []
    for b in range(n_batches):
        for i in range(n_users):
            user = f"u{i:07d}"
            rr = np.round(1000 + rng.normal(0, 40, 60), 1)
            t = start_ns + b * 60 * 10**9 + np.cumsum(rr * 1e6).astype(np.int64)
            out.append((user, b, binary.encode(user=user, stream_id="s", seq=b, source="bench", time_ns=t, metric_code=np.zeros(60, np.uint8), value=rr)))
    return out


def publish_all(jsio: JetStreamIO, layout: Layout, items: list[tuple[str, int, bytes]], window: int = 2000) -> None:
    """Publish with up to ``window`` acknowledgements outstanding (as a bridge would)."""

    async def run() -> None:
        sem = asyncio.Semaphore(window)

        async def one(user: str, seq: int, payload: bytes) -> None:
            async with sem:
                for _ in range(20):
                    try:
                        await jsio.js.publish(layout.subject(partition_of(user, layout.partitions)), payload, headers=ingest_headers(user, "s", seq), timeout=20)
                        return
                    except Exception:  # noqa: BLE001 - again, same message id
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(one(*it) for it in items))

    jsio.call(run(), 3600)


def grant_all(jsio: JetStreamIO, layout: Layout, users: list[str]) -> None:
    now = datetime.now(timezone.utc)

    async def run() -> None:
        kv = await jsio.js.key_value(layout.consent)
        sem = asyncio.Semaphore(500)

        async def one(u: str) -> None:
            async with sem:
                await kv.put(u, encode_consent(u, [ConsentEvent(u, Action.GRANT, now, "bench", recipients=("w1",))]))

        await asyncio.gather(*(one(u) for u in users))

    jsio.call(run(), 600)


def owners(jsio: JetStreamIO, layout: Layout) -> dict[int, str | None]:
    got = jsio.leases([layout.lease_key(p) for p in range(layout.partitions)])
    now = time.time()
    return {p: (l.owner if l is not None and l.live(now) else None) for p, (l, _) in enumerate(got.values())}


def pending(jsio: JetStreamIO, layout: Layout) -> int:
    total = 0
    for p in range(layout.partitions):
        _, n = jsio.partition_info(p)
        total += n if n is not None else 10**9
    return total


def wait(cond, timeout_s: float, every_s: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # noqa: BLE001 - a request timing out on a loaded host: ask again
            pass
        time.sleep(every_s)
    return False


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def uptime() -> str:
    """``uptime``'s load part (the machine is shared: every figure is read beside it)."""
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return out.split("load average:")[-1].strip() if "load average:" in out else out


def run_one(
    nats_urls: list[str], nats_pids: list[int], mqtt_url: str, work: Path, n_users: int, n_batches: int, k: int, preload: bool, replicas: int | None = None
) -> dict[str, object]:
    name = "b" + uuid.uuid4().hex[:6]
    settings = Settings()
    c = settings.cluster
    replicas = replicas or c.replicas
    layout = Layout(partitions=c.partitions, replicas=replicas, name=name)
    jsio = open_ready(nats_urls, layout, name="bench", retention_s=c.retention_days * 86_400)
    users = [f"u{i:07d}" for i in range(n_users)]
    grant_all(jsio, layout, users)
    items = batches(n_users, n_batches)
    extra = batches(n_users, n_batches + 1, seed=2)[-n_users:]  # one more round, for the takeover
    cfg = work / f"{name}.toml"
    cfg.write_text(f'[mqtt]\nurl = "{mqtt_url}"\nclient_id = "bench-{name}"\n[store]\nstate_dir = "{work / name}"\n[cluster]\nname = "{name}"\n' + (f"replicas = {replicas}\n" if replicas != c.replicas else ""))
    if preload:  # a backlog: the engines' drain rate is then theirs, not the publisher's
        publish_all(jsio, layout, items)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    t_start = time.monotonic()
    for e in range(k):
        eid = f"e{e + 1}"
        log = (work / f"{name}-{eid}.log").open("ab")
        procs[eid] = subprocess.Popen(
            [sys.executable, "-m", "stresswatch.cli", "engine", "--config", str(cfg), "--cluster", ",".join(nats_urls), "--engine-id", eid],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    ps = [psutil.Process(p.pid) for p in procs.values()]
    try:
        want = {f"e{e + 1}" for e in range(k)}
        assert wait(lambda: all(owners(jsio, layout).values()) and set(owners(jsio, layout).values()) == want, 180), "engines did not share the partitions"
        servers = [psutil.Process(pid) for pid in nats_pids]
        msgs = len(items)
        if preload:
            # measured from the moment the K engines share the partitions (every owner's consumer
            # open), over what is still pending then: one engine's start-up and the lease
            # hand-over (one partition per renewal round) are not counted against K engines
            # every owner's consumer open (a partition without one counts as 10**9 pending)
            assert wait(lambda: pending(jsio, layout) < 10**9, 120, 0.1), "a partition's consumer was not opened"
            cpu0, me0, t0 = cpu_s(ps), psutil.Process().cpu_times(), time.monotonic()
            msgs = pending(jsio, layout)
            startup_s = t0 - t_start
        else:
            time.sleep(1.0)
            cpu0, me0, t0 = cpu_s(ps), psutil.Process().cpu_times(), time.monotonic()
            publish_all(jsio, layout, items)
            startup_s = 0.0
        nats0 = cpu_s(servers)
        t_pub = 0.0 if preload else time.monotonic() - t0
        me1 = psutil.Process().cpu_times()
        assert wait(lambda: pending(jsio, layout) == 0, 1800, 0.5), "the engines did not catch up"
        t_all = time.monotonic() - t0
        cpu1, nats1 = cpu_s(ps), cpu_s(servers)
        row: dict[str, object] = {
            "engines": k, "preload": preload, "users": n_users, "messages": msgs, "backlog": len(items), "startup_s": round(startup_s, 1), "publish_s": round(t_pub, 1), "drain_s": round(t_all, 1),
            "messages_per_s": round(msgs / t_all), "engine_cpu_s": round(cpu1 - cpu0, 1),
            "engine_us_per_message": round((cpu1 - cpu0) / msgs * 1e6), "engine_cores": round((cpu1 - cpu0) / t_all, 2),
            "publisher_cpu_s": round((me1.user + me1.system) - (me0.user + me0.system), 1),
            "nats_cores": round((nats1 - nats0) / max(t_all - t_pub, 1e-9), 2),  # the three servers, after publishing
            "users_real_time_at_60s_batches": round(msgs / t_all * 60), "load_avg": [round(x, 1) for x in os.getloadavg()],
            "uptime": uptime(), "nats_nodes": len(nats_pids), "replicas": replicas,
        }  # fmt: skip
        if k >= 2:
            victim = "e1"
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(10)
            t_kill = time.monotonic()
            publish_all(jsio, layout, extra)
            ok = wait(lambda: victim not in owners(jsio, layout).values() and all(owners(jsio, layout).values()), 120, 0.1)
            row["takeover_owned_s"] = round(time.monotonic() - t_kill, 1) if ok else None
            ok = wait(lambda: pending(jsio, layout) == 0, 300, 0.25)
            row["takeover_caught_up_s"] = round(time.monotonic() - t_kill, 1) if ok else None
        return row
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        jsio.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--batches", type=int, default=5, help="batches per user (60 s of data each)")
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preload", action="store_true", help="publish everything before the engines start (a backlog: engine-limited drain, measured once the engines share the partitions)")
    ap.add_argument("--nats-nodes", type=int, choices=(1, 3), default=3, help="NATS servers (1: a deviation, to measure the engines apart from NATS)")
    ap.add_argument("--replicas", type=int, help="JetStream replicas (default: the product's cluster.replicas; another value is a deviation)")
    ap.add_argument("--out", type=Path, help="JSON results")
    args = ap.parse_args(argv)
    default_replicas = Settings().cluster.replicas
    replicas = args.replicas or (default_replicas if args.nats_nodes >= default_replicas else args.nats_nodes)
    deviations = list(DEVIATIONS)
    if args.nats_nodes != 3:
        deviations.append(f"{args.nats_nodes} NATS server instead of a 3-node cluster")
    if replicas != default_replicas:
        deviations.append(f"replicas {replicas} instead of {default_replicas}")
    mode = "backlog published first" if args.preload else "published while the engines pull"
    print(f"# cluster mode: {args.users} users x {args.batches} batches, engines {args.engines}, {mode}; deviations: {'; '.join(deviations)}", flush=True)
    print(f"# machine: {os.cpu_count()} cores, shared with other work; load average at start: {uptime()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="swcluster-"))
    cluster = start_cluster(work / "nats", args.nats_nodes)
    mport = free_port()
    (work / "mq").mkdir()
    (work / "mosquitto.conf").write_text(mosquitto_conf(port=mport, data_dir=work / "mq", allow_anonymous=True, run_as=getpass.getuser()))
    mosq = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")], stderr=subprocess.DEVNULL)
    rows = []
    try:
        time.sleep(1)
        for k in args.engines:
            row = run_one(cluster.urls, [n.proc.pid for n in cluster.nodes if n.proc], f"mqtt://127.0.0.1:{mport}", work, args.users, args.batches, k, args.preload, replicas)
            row["deviations"] = deviations
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        mosq.terminate()
        cluster.stop()
    if args.out:
        args.out.write_text(json.dumps({"deviations": deviations, "rows": rows}, indent=1))
    base = next((r["messages_per_s"] for r in rows if r["engines"] == 1), None)
    print(f"\ndeviations: {'; '.join(deviations)}")
    print("| NATS nodes / replicas | engines | users | messages | publish s | drain s | msgs/s | scale-out vs 1 | engine µs/msg | engine cores | NATS cores | msgs/s x 60 s | takeover: owned / caught up | load avg (uptime, after the row) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        take = f"{r.get('takeover_owned_s')} s / {r.get('takeover_caught_up_s')} s" if "takeover_owned_s" in r else "-"
        scale = f"{r['messages_per_s'] / base:.2f}" if base else "-"
        print(f"| {r['nats_nodes']} / {r['replicas']} | {r['engines']} | {r['users']:,} | {r['messages']:,} | {r['publish_s']} | {r['drain_s']} | {r['messages_per_s']:,} | {scale} | {r['engine_us_per_message']} | {r['engine_cores']} | {r['nats_cores']} | {r['users_real_time_at_60s_batches']:,} | {take} | {r['uptime']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
