"""What password stretching costs the broker: CONNECT round trips against a real Mosquitto
running the configuration `stresswatch broker config` writes.

    python benchmarks/bench_broker_auth.py [--connects 300] [--repeat 3]

Three accounts whose ``$7$`` hashes use 101 iterations (mosquitto_passwd's default, the
reference), 1,000 (ours, ``stresswatch.broker.PBKDF2_ITERATIONS``) and 10,000. For each,
--connects sequential MQTT 5 CONNECT/CONNACK/DISCONNECT with a raw paho socket loop (no
threads), best of --repeat; plus one anonymous attempt per run to show it is refused.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import paho.mqtt.client as mqtt

from stresswatch.broker import BrokerDir, Role, free_port, hash_password


def one_connect(port: int, user: str | None, password: str | None) -> bool:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if user:
        c.username_pw_set(user, password)
    ok: list[bool] = []
    c.on_connect = lambda cl, ud, fl, rc, pr=None: ok.append(not rc.is_failure)
    c.connect("127.0.0.1", port)
    deadline = time.monotonic() + 5
    while not ok and time.monotonic() < deadline:
        c.loop(0.01)
    c.disconnect()
    c.loop(0.01)
    return bool(ok and ok[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with tempfile.TemporaryDirectory() as tmp:
        d = BrokerDir(Path(tmp) / "broker")
        port = free_port()
        d.write_config(port=port, run_as=None if sys.platform != "linux" else __import__("getpass").getuser())
        iterations = {"it101": 101, "it1000": 1000, "it10000": 10000}
        lines = []
        for name, n in iterations.items():
            d.add(Role.USER, name, "bench-password")
            lines.append(f"{name}:{hash_password('bench-password', iterations=n)}")
        d.passwd.write_text("\n".join(lines) + "\n")
        proc = subprocess.Popen([mosquitto, "-c", str(d.conf)], stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.05)
            print(f"# {date.today()} {platform.processor() or platform.machine()} Python {platform.python_version()}")
            print(f"anonymous CONNECT accepted: {one_connect(port, None, None)}")
            for name, n in iterations.items():
                assert one_connect(port, name, "bench-password")
                best = float("inf")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    for _ in range(args.connects):
                        one_connect(port, name, "bench-password")
                    best = min(best, time.perf_counter() - t)
                print(f"{n:>6} iterations: {args.connects / best:8.0f} CONNECT/s, {best / args.connects * 1e3:6.2f} ms each")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
