"""The pipeline: samples -> detector -> alert dispatcher (consent gate at send time) -> transport.

The same :class:`Pipeline` runs in the demo, a replay, the tests and the engine. It owns no
alert logic of its own: every alert the detector raises goes to the :class:`Dispatcher` it
was given, which records it in the outbox, expands groups, applies cooldown, quiet hours
and the escalation policy, and publishes through its transport after the consent gate.
Only the edges differ: the transport (MQTT or in memory), the clock (wall clock in the
engine; the replayed data's time in a replay or the demo, see :class:`DataClock`) and the
outbox file (durable in the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import polars as pl

from .alerts.dispatch import Dispatcher
from .alerts.lifecycle import AlertRecord
from .config import DetectorSettings
from .consent.state import ConsentState
from .detect import Detector, DetectorOutput
from .model import WINDOW_SCHEMA, AlertDecision


def person_timezone(user: str, consent: ConsentState, settings: DetectorSettings) -> str:
    """The IANA zone of ``user``'s time-of-day baselines: the one their consent names (the
    person's own word, which a later grant can move when they travel), else
    ``[detector] user_timezones``, else ``[detector] timezone`` (UTC unless configured)."""
    return consent.timezone or settings.user_timezones.get(user) or settings.timezone


@dataclass(frozen=True)
class AlertOutcome:
    """What the dispatcher did with one raised alert (``record`` as of ``decided_at``)."""

    decision: AlertDecision
    record: AlertRecord
    decided_at: datetime

    @property
    def sent(self) -> bool:
        """At least one worker was notified."""
        return bool(self.record.targets)

    @property
    def verdict(self) -> str:
        """The gate's verdict (``send``, ``withheld_...``, ``deferred_quiet_hours``) or
        ``suppressed_cooldown``."""
        return self.record.verdict or self.record.state.value


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
    """What a run produced, in order (kept only if the pipeline was asked to: replay, demo)."""

    windows: list[pl.DataFrame] = field(default_factory=list)
    outcomes: list[AlertOutcome] = field(default_factory=list)
    n_windows: int = 0
    users: set[str] = field(default_factory=set)

    def windows_frame(self) -> pl.DataFrame:
        frame = pl.concat([pl.DataFrame(schema=WINDOW_SCHEMA), *self.windows], how="vertical")
        return frame.sort("user", "window_start")

    def alerts_frame(self) -> pl.DataFrame:
        """One row per alert: the consent verdict and every worker notified (groups expanded)."""
        rows = [
            {
                "alert_id": o.decision.alert_id,
                "user": o.decision.user,
                "raised_at": o.decision.raised_at,
                "episode_start": o.decision.episode_start,
                "level": o.decision.level.value,
                "reasons": [r.value for r in o.decision.reasons],
                "score": o.decision.score,
                "consent": o.verdict,
                "sent": o.sent,
                "recipients": list(o.record.targets),
            }
            for o in self.outcomes
        ]
        return pl.DataFrame(rows, schema=ALERT_OUTCOME_SCHEMA).sort("raised_at", "user")

    @property
    def sent(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if o.sent]

    @property
    def withheld(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if not o.sent]


class DataClock:
    """The clock of a replay (and the demo): the time of the data being replayed, set by the
    caller as batches go by. Cooldown, quiet hours and escalation then act on data time, as
    they would have live, however fast the replay runs."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(1970, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self._now

    def set(self, now: datetime) -> None:
        self._now = now

    def set_to_end_of(self, batch: pl.DataFrame) -> None:
        """The time of the batch's last sample (unchanged for an empty batch)."""
        if batch.height:
            last = batch.get_column("time").max()
            assert isinstance(last, datetime)
            self._now = last


class Pipeline:
    """Detector -> dispatcher. ``keep_windows`` / ``keep_alerts``: keep what was produced in
    :attr:`report` (a replay; the engine keeps nothing: it runs for months)."""

    def __init__(
        self,
        detector: Detector,
        dispatcher: Dispatcher,
        *,
        keep_windows: bool = False,
        keep_alerts: bool = False,
        on_alert: Callable[[AlertOutcome], None] | None = None,
        data_clock: DataClock | None = None,
    ) -> None:
        """``data_clock``: the dispatcher's clock in a replay; each alert is then dispatched at
        its own ``raised_at`` (after what fell due before it), not at the end of its batch."""
        self.detector = detector
        self.dispatcher = dispatcher
        self.on_alert = on_alert
        self.report = PipelineReport()
        self._keep_windows = keep_windows
        self._keep_alerts = keep_alerts
        self._data_clock = data_clock
        self.zones: dict[str, str] = {}  # the zone given to the detector per user (see :meth:`place`)

    def process(self, batch: pl.DataFrame) -> DetectorOutput:
        """Feed one batch; hand what it raised to the dispatcher."""
        return self.dispatch(self.detect(batch))

    def detect(self, batch: pl.DataFrame) -> DetectorOutput:
        """The detector's half of :meth:`process` (the engine isolates the two per user)."""
        if self._keep_alerts and batch.height:
            self.report.users.update(batch.get_column("user").unique().to_list())
        return self.detector.update(batch)

    def dispatch(self, out: DetectorOutput) -> DetectorOutput:
        """The dispatcher's half of :meth:`process`: windows reported, alerts raised."""
        return self._handle(out)

    def advance(self, now: datetime, grace_s: int = 60) -> DetectorOutput:
        """Live tick: finish windows that ended ``grace_s`` before ``now`` without more data."""
        return self._handle(self.detector.advance(int(now.timestamp() * 1e9), grace_s))

    def tick(self) -> int:
        """Act on alerts whose time has come (quiet hours over, escalation, reminders) and
        publish what is pending; returns how many were acted on."""
        n = self.dispatcher.run_due()
        self.dispatcher.pump()
        return n

    def finish(self, drain_s: float = 10.0) -> DetectorOutput:
        """End of input: finish open windows, dispatch their alerts, wait for the broker's acks."""
        out = self._handle(self.detector.flush())
        self.tick()
        self.dispatcher.drain(drain_s)
        if self._keep_alerts:  # the records as they ended (a deferred alert may have gone out since)
            outbox = self.dispatcher.outbox
            self.report.outcomes = [
                AlertOutcome(o.decision, outbox.get(o.decision.alert_id) or o.record, o.decided_at) for o in self.report.outcomes
            ]
        return out

    def place(self, user: str, consent: ConsentState) -> str:
        """Score ``user``'s time-of-day slots in their own zone (:func:`person_timezone`); a
        change applies to the windows finished from now on. Returns the zone."""
        zone = person_timezone(user, consent, self.detector.settings)
        if self.zones.get(user) != zone:
            self.detector.set_timezone(user, zone)
            self.zones[user] = zone
        return zone

    def forget(self, user: str) -> None:
        """Drop the user's detector state (consent withdrawn, erasure)."""
        self.detector = self.detector.forget(user)
        self.zones.pop(user, None)

    def _handle(self, out: DetectorOutput) -> DetectorOutput:
        self.report.n_windows += out.windows.height
        if self._keep_windows and out.windows.height:
            self.report.windows.append(out.windows)
        if out.alerts:
            decisions = list(out.alerts)
            records = self._dispatch(decisions)
            if self._keep_alerts or self.on_alert is not None:
                now = self.dispatcher.clock()
                for d, rec in zip(decisions, records, strict=True):
                    outcome = AlertOutcome(d, rec, now)
                    if self._keep_alerts:
                        self.report.outcomes.append(outcome)
                    if self.on_alert is not None:
                        self.on_alert(outcome)
        return out

    def _dispatch(self, decisions: list[AlertDecision]) -> list[AlertRecord]:
        if self._data_clock is None:
            return self.dispatcher.raise_alerts(decisions)  # one detector output: one outbox transaction
        clock, at_end = self._data_clock, self._data_clock()
        records: dict[str, AlertRecord] = {}
        for d in sorted(decisions, key=lambda d: (d.raised_at, d.user)):
            clock.set(d.raised_at)
            self.dispatcher.run_due()  # escalations and quiet hours that fell due before this alert
            records[d.alert_id] = self.dispatcher.raise_alert(d)
        clock.set(max(at_end, clock()))
        return [records[d.alert_id] for d in decisions]


__all__ = ["ALERT_OUTCOME_SCHEMA", "AlertOutcome", "DataClock", "Pipeline", "PipelineReport"]
