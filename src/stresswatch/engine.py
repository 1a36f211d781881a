"""The pipeline: source -> detector -> consent gate (at send time) -> transport.

The same :class:`Pipeline` object runs in the demo, in a replay and in the tests; only its
edges differ (the source it is fed, the transport it sends through, the clock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import polars as pl

from .alerts.topics import Topics
from .alerts.transport import Transport
from .consent.gate import GateDecision, Verdict, decide
from .consent.ledger import ConsentLedger
from .detect import Detector, DetectorOutput
from .model import WINDOW_SCHEMA, AlertDecision
from .sources import Source

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class AlertOutcome:
    decision: AlertDecision
    gate: GateDecision
    decided_at: datetime


ALERT_OUTCOME_SCHEMA: dict[str, pl.DataType] = {
    "alert_id": pl.String(),
    "user": pl.String(),
    "raised_at": pl.Datetime("ns", "UTC"),
    "episode_start": pl.Datetime("ns", "UTC"),
    "level": pl.String(),
    "reasons": pl.List(pl.String()),
    "score": pl.Float64(),
    "consent": pl.String(),
    "sent": pl.Boolean(),
    "recipients": pl.List(pl.String()),
}


@dataclass
class PipelineReport:
    """Everything a run produced, in order. Windows are kept only if asked (replay)."""

    windows: list[pl.DataFrame] = field(default_factory=list)
    outcomes: list[AlertOutcome] = field(default_factory=list)
    n_windows: int = 0
    users: set[str] = field(default_factory=set)

    def windows_frame(self) -> pl.DataFrame:
        frame = pl.concat([pl.DataFrame(schema=WINDOW_SCHEMA), *self.windows], how="vertical")
        return frame.sort("user", "window_start")

    def alerts_frame(self) -> pl.DataFrame:
        rows = [
            {
                "alert_id": o.decision.alert_id,
                "user": o.decision.user,
                "raised_at": o.decision.raised_at,
                "episode_start": o.decision.episode_start,
                "level": o.decision.level.value,
                "reasons": [r.value for r in o.decision.reasons],
                "score": o.decision.score,
                "consent": o.gate.verdict.value,
                "sent": o.gate.allowed,
                "recipients": list(o.gate.recipients),
            }
            for o in self.outcomes
        ]
        return pl.DataFrame(rows, schema=ALERT_OUTCOME_SCHEMA).sort("raised_at", "user")

    @property
    def sent(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if o.gate.allowed]

    @property
    def withheld(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if not o.gate.allowed]


class Pipeline:
    """Wires the seams. ``ledger`` None means no one has consented (every alert withheld)."""

    def __init__(
        self,
        detector: Detector,
        transport: Transport,
        *,
        ledger: ConsentLedger | None = None,
        topics: Topics | None = None,
        clock: Clock = utc_now,
        alert_expiry_s: int = 24 * 3600,
        keep_windows: bool = False,
        on_alert: Callable[[AlertOutcome], None] | None = None,
    ) -> None:
        self.detector = detector
        self.transport = transport
        self.ledger = ledger
        self.topics = topics or Topics()
        self.clock = clock
        self.alert_expiry_s = alert_expiry_s
        self.on_alert = on_alert
        self.report = PipelineReport()
        self._keep_windows = keep_windows

    def process(self, batch: pl.DataFrame) -> DetectorOutput:
        """Feed one batch; send what it decided."""
        if batch.height:
            self.report.users.update(batch.get_column("user").unique().to_list())
        return self._handle(self.detector.update(batch))

    def finish(self) -> DetectorOutput:
        """End of input: finish open windows, send their alerts, wait for the broker's acks."""
        out = self._handle(self.detector.flush())
        self.transport.flush()
        return out

    async def run(self, sources: Iterable[Source]) -> PipelineReport:
        for source in sources:
            async for batch in source:
                self.process(batch)
        self.finish()
        return self.report

    def _handle(self, out: DetectorOutput) -> DetectorOutput:
        self.report.n_windows += out.windows.height
        if self._keep_windows and out.windows.height:
            self.report.windows.append(out.windows)
        for decision in out.alerts:
            self._send(decision)
        return out

    def _send(self, decision: AlertDecision) -> None:
        # SPEC: consent is checked at send time, reading the ledger now, not when raised.
        now = self.clock()
        state = self.ledger.state(decision.user) if self.ledger is not None else None
        gate = decide(state, decision, now)
        if gate.allowed and gate.payload is not None:
            payload = gate.payload.model_dump_json().encode()
            for worker in gate.recipients:
                self.transport.publish(self.topics.alerts(worker), payload, qos=1, expiry_s=self.alert_expiry_s)
        outcome = AlertOutcome(decision, gate, now)
        self.report.outcomes.append(outcome)
        if self.on_alert:
            self.on_alert(outcome)


__all__ = ["ALERT_OUTCOME_SCHEMA", "AlertOutcome", "Pipeline", "PipelineReport", "Verdict", "utc_now"]
