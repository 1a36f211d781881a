"""A real 3-node NATS JetStream cluster for tests (and benchmarks/load/cluster.py): its own
processes on free loopback ports, each with its own configuration, server name and store
directory (never the system's NATS)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from stresswatch.broker import free_port
from stresswatch.cluster.layout import Layout
from stresswatch.cluster.natsconf import NodeConf, node_conf as product_node_conf

from conftest import wait_listening

NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


@dataclass
class NatsNode:
    name: str
    port: int
    cluster_port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None
    mqtt_port: int = 0  # NATS's own MQTT listener (0: none)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.conf.with_suffix(".log")
        self.proc = subprocess.Popen([str(NATS_SERVER), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=log.open("ab"))
        wait_listening(self.proc, self.port, f"nats-server {self.name}", lambda: log.read_text()[-2000:])

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class NatsCluster:
    nodes: list[NatsNode] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """The comma-separated list the engine's ``--cluster`` takes."""
        return ",".join(self.urls)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def node_conf(name: str, port: int, cluster_port: int, routes: list[int], store: Path) -> str:
    route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
    return f"""server_name: {name}
listen: 127.0.0.1:{port}
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 2GB
}}
cluster {{
  name: swtest
  listen: 127.0.0.1:{cluster_port}
  routes: [{route_list}]
}}
"""


def start_single(root: Path) -> NatsNode:
    """One plain JetStream server (no routes, no MQTT listener, no mappings), started."""
    if NATS_SERVER is None:
        raise RuntimeError("nats-server is not installed: the cluster tests need it (apt-get install nats-server)")
    root.mkdir(parents=True)
    conf = root / "nats.conf"
    port = free_port()
    conf.write_text(f'server_name: solo\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: "{root / "store"}"\n}}\n')
    node = NatsNode("solo", port, 0, conf)
    node.start()
    return node


def start_cluster(root: Path, n: int = 3, *, mqtt_layout: Layout | None = None) -> NatsCluster:
    """``n`` nodes (1: a single server, no routes); with ``mqtt_layout`` each node also has
    NATS's MQTT listener and the product's subject mappings (``cluster.natsconf``)."""
    if NATS_SERVER is None:
        raise RuntimeError("nats-server is not installed: the cluster tests need it (apt-get install nats-server)")
    if mqtt_layout is not None or n == 1:
        return _start_product_conf(root, n, mqtt_layout)
    ports = [(free_port(), free_port()) for _ in range(n)]
    cluster = NatsCluster()
    for i, (port, cport) in enumerate(ports):
        d = root / f"n{i + 1}"
        d.mkdir(parents=True)
        conf = d / "nats.conf"
        conf.write_text(node_conf(f"n{i + 1}", port, cport, [c for _, c in ports], d / "store"))
        cluster.nodes.append(NatsNode(f"n{i + 1}", port, cport, conf))
    for node in cluster.nodes:
        node.start()
    return cluster


def _start_product_conf(root: Path, n: int, mqtt_layout: Layout | None) -> NatsCluster:
    ports = [(free_port(), free_port(), free_port() if mqtt_layout is not None else 0) for _ in range(n)]
    routes = tuple(f"127.0.0.1:{c}" for _, c, _ in ports) if n > 1 else ()
    cluster = NatsCluster()
    for i, (port, cport, mport) in enumerate(ports):
        d = root / f"n{i + 1}"
        d.mkdir(parents=True)
        conf = d / "nats.conf"
        node = NodeConf(f"n{i + 1}", f"127.0.0.1:{port}", f"127.0.0.1:{mport}" if mport else None, d / "store", f"127.0.0.1:{cport}", routes, "swtest")
        conf.write_text(product_node_conf(node, mqtt_layout or Layout(user_token=True)))
        cluster.nodes.append(NatsNode(f"n{i + 1}", port, cport, conf, mqtt_port=mport))
    for node in cluster.nodes:
        node.start()
    return cluster
