"""The engine's operator metrics (Prometheus text format) and its health endpoint.

One :class:`EngineMetrics` per engine, on its own ``CollectorRegistry`` (no process-global
registry: two engines in one process, or a test beside a service, do not share counters).
What the engine already counts for itself (ingest, alert dispatch, queue) is read at scrape
time through :class:`EngineStats` by a collector, so there is one count per concern; only
the distributions the engine does not otherwise keep are observed here as they happen
(alert delivery latency, state save time, ingest wait).

No metric has a per-user or per-worker label: the ids are personal and unbounded in number.

:class:`MetricsServer` serves ``/metrics`` and ``/healthz`` on a small thread (stdlib HTTP
server; ``prometheus_client`` renders the text). Health (:func:`assess_health`, pure):

* ``running``: the engine has started and is not stopping;
* ``broker``: both MQTT links (alerts/consent and ingest) are connected;
* ``loop``: the engine thread started a job or turned its loop within ``stall_s``
  (a thread stuck in one job, or a dead loop, stops ingest and alerts alike).

``/healthz`` answers 200 when every check passes, else 503, with the checks as JSON.
A growing backlog is not "unhealthy" (restarting would not help): alert on
``stresswatch_ingest_wait_max_seconds`` or the queue gauge instead (docs/CONFIG.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .service import EngineStats

log = logging.getLogger("stresswatch.engine")

# Alert delivery: the target is 1 s from decision to the broker's acknowledgement; the tail
# up to a minute says how far off it is.
DELIVERY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A state save: tens of ms for a few users, seconds for a whole detector at 100,000.
SAVE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A batch's wait for the detector: the flush interval (0.5 s) is the floor; over 1 s is a stall.
WAIT_BUCKETS_S = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Health:
    """The engine's health: ``ok`` if every check passed; ``checks`` name -> passed."""

    ok: bool
    checks: Mapping[str, bool]
    loop_age_s: float

    def body(self) -> bytes:
        return json.dumps({"status": "ok" if self.ok else "unhealthy", "checks": dict(self.checks), "loop_age_s": round(self.loop_age_s, 3)}).encode()


def assess_health(*, running: bool, broker_links: Mapping[str, bool | None], loop_age_s: float, stall_s: float) -> Health:
    """Pure: the checks above. A link whose state is unknown (``None``) fails: health that
    cannot see the broker must not claim it is there."""
    checks = {
        "running": running,
        "broker": bool(broker_links) and all(v is True for v in broker_links.values()),
        "loop": running and loop_age_s <= stall_s,
    }
    return Health(all(checks.values()), checks, loop_age_s)


class EngineMetrics:
    """The engine's metrics registry: counters read from :class:`EngineStats` at scrape time,
    histograms and gauges observed by the engine's hooks (any thread)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._mono = monotonic
        r = self.registry
        self.alert_delivery = Histogram(
            "stresswatch_alert_delivery_seconds",
            "Alert raised by the engine to its first notice acknowledged by the broker (PUBACK)",
            buckets=DELIVERY_BUCKETS_S,
            registry=r,
        )
        self.state_save = Histogram(
            "stresswatch_state_save_seconds", "One state save, from its start to everything written", buckets=SAVE_BUCKETS_S, registry=r
        )
        self.ingest_wait = Histogram(
            "stresswatch_ingest_wait_seconds",
            "Oldest batch of each flush: handed to the engine (durable, acknowledged) to processed by the detector",
            buckets=WAIT_BUCKETS_S,
            registry=r,
        )
        self._wait_max = Gauge("stresswatch_ingest_wait_max_seconds", "Longest ingest wait since start (see stresswatch_ingest_wait_seconds)", registry=r)
        self._wait_max_s = 0.0
        self._last_beat = monotonic()
        self._stats: Callable[[], EngineStats] | None = None
        self._health: Callable[[], Health] | None = None

    # -- hooks (cheap: called on the hot path) ------------------------------------------
    def beat(self) -> None:
        """The engine thread is turning (a job started, or the loop went round)."""
        self._last_beat = self._mono()

    def loop_age_s(self) -> float:
        return max(0.0, self._mono() - self._last_beat)

    def waited(self, seconds: float) -> None:
        self.ingest_wait.observe(seconds)
        if seconds > self._wait_max_s:
            self._wait_max_s = seconds
            self._wait_max.set(seconds)

    # -- scrape-time counters -------------------------------------------------------------
    def bind(self, stats: Callable[[], EngineStats], health: Callable[[], Health]) -> None:
        """Read counters from ``stats()`` and health from ``health()`` at each scrape (once)."""
        if self._stats is not None:
            raise RuntimeError("metrics are already bound to an engine")
        self._stats, self._health = stats, health
        self.registry.register(_StatsCollector(stats, health))

    def health(self) -> Health:
        if self._health is None:
            return Health(False, {"running": False}, self.loop_age_s())
        return self._health()


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], health: Callable[[], Health]) -> None:
        self._stats = stats
        self._health = health

    def describe(self) -> list[Metric]:
        return []  # families depend on the stats at hand; registering needs no names up front

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        msgs = CounterMetricFamily("stresswatch_ingest_messages", "Ingest messages taken by the receiver, by result", labels=["result"])
        msgs.add_metric(["accepted"], st.accepted or 0)
        msgs.add_metric(["duplicate"], st.duplicates or 0)
        yield msgs
        rej = CounterMetricFamily("stresswatch_messages_rejected", "Messages refused at the wire boundary, by kind and reason", labels=["kind", "reason"])
        for (kind, reason), n in sorted(st.rejections.items()):
            rej.add_metric([kind, reason], n)
        yield rej
        yield CounterMetricFamily("stresswatch_ingest_batches", "Batches taken by the engine thread (processed or dropped)", value=st.batches_processed)
        yield CounterMetricFamily("stresswatch_ingest_samples", "Samples given to the detector", value=st.samples_processed)
        dropped = CounterMetricFamily("stresswatch_ingest_batches_dropped", "Batches not processed, by reason", labels=["reason"])
        dropped.add_metric(["no_consent"], st.dropped_batches)
        dropped.add_metric(["quarantined"], st.dropped_quarantined)
        yield dropped
        yield GaugeMetricFamily("stresswatch_engine_queue_jobs", "Jobs waiting for the engine thread (the ingest backlog, mostly)", value=st.queue)
        yield GaugeMetricFamily("stresswatch_ingest_buffered_batches", "Batches waiting in the ingest buffer for the next flush", value=st.buffered)
        yield GaugeMetricFamily("stresswatch_detector_users", "Users in the detector's memory", value=st.users)
        yield GaugeMetricFamily("stresswatch_users_quarantined", "Users set aside after a fault in their data path", value=st.quarantined)
        a = st.alerts
        for name, value, text in (
            ("raised", a.raised, "Alerts raised (new decisions of the detector or check-ins)"),
            ("published", a.published, "Alert notices published to the broker (first and repeated)"),
            ("republished", a.republished, "Alert notices published again (no PUBACK in time, or the broker connection lost)"),
            ("delivered", a.delivered, "Alert notices acknowledged by the broker (PUBACK): in the worker's session"),
            ("acknowledged", a.acknowledged, "Alerts a worker acknowledged (\"I'm reaching out\")"),
            ("withheld", a.withheld, "Alerts the consent gate withheld at send time"),
            ("suppressed", a.suppressed, "Alerts not sent: the user's cooldown"),
            ("undeliverable", a.undeliverable, "Deliveries dropped: no topic for the recipient, or a stored delivery failed (lost)"),
        ):
            yield CounterMetricFamily(f"stresswatch_alerts_{name}", text, value=value)
        yield GaugeMetricFamily("stresswatch_alerts_in_flight", "Alert notices published, PUBACK not yet seen", value=st.alerts_in_flight)
        links = GaugeMetricFamily("stresswatch_broker_connected", "1 if the MQTT link is connected", labels=["link"])
        for link, up in sorted(st.broker_links.items()):
            links.add_metric([link], 1.0 if up else 0.0)
        yield links
        h = self._health()
        yield GaugeMetricFamily("stresswatch_engine_loop_age_seconds", "Since the engine thread last started a job or turned its loop", value=h.loop_age_s)
        yield GaugeMetricFamily("stresswatch_engine_healthy", "1 if /healthz passes", value=1.0 if h.ok else 0.0)


class MetricsServer:
    """``/metrics`` (Prometheus text or OpenMetrics, by the scraper's Accept header) and
    ``/healthz`` on ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(self, metrics: EngineMetrics, host: str, port: int) -> None:
        self._metrics = metrics
        handler = _handler(metrics)
        self._server = ThreadingHTTPServer((host, port), handler)  # OSError if the port is taken
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(metrics: EngineMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, content_type, encoder(metrics.registry))
            elif path == "/healthz":
                h = metrics.health()
                self._send(200 if h.ok else 503, "application/json", h.body())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: /metrics or /healthz\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not logged
            return

    return Handler


__all__ = ["EngineMetrics", "Health", "MetricsServer", "assess_health"]
