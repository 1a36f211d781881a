"""The dispatcher: raised alerts -> outbox -> consent gate at publish time -> transport.

Delivery is at-least-once: every delivery is a row in the outbox until the broker's PUBACK;
one that is not acknowledged within ``resend_after_s`` (or is still pending after a restart)
is published again with the same ``alert_id``, and worker clients drop duplicates.

The consent gate runs immediately before *each* publish, reading the ledger then: an alert
raised before a revocation and not yet published is never published after it. All methods
run on one thread (the engine's loop), which is also the thread that records consent
received over MQTT, so a recorded revocation is always seen by the next publish.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ..clock import Clock
from ..config import Settings
from ..consent.gate import Verdict, alert_wire, decide
from ..consent.ledger import ConsentLedger
from ..errors import TransportError
from ..model import Alert, AlertDecision, Reason
from ..wire.acks import AckAction, AckMessage
from .lifecycle import (
    Acknowledged,
    AlertRecord,
    AlertState,
    Deferred,
    Delivered,
    EscalationPolicy,
    Escalate,
    LifecycleError,
    Remind,
    Resolved,
    Sent,
    Suppressed,
    Withheld,
    apply,
    first_due,
    next_action,
    route,
)
from .outbox import Delivery, Outbox
from .topics import Topics
from .transport import Receipt, Transport

log = logging.getLogger("stresswatch.alerts")


@dataclass
class _InFlight:
    receipt: Receipt
    sent_mono: float
    alert_id: str
    worker: str
    first_queued_at: datetime | None  # the alert's raise time if this is its first notice


@dataclass
class DispatchStats:
    raised: int = 0
    published: int = 0
    republished: int = 0
    delivered: int = 0
    withheld: int = 0
    suppressed: int = 0  # not sent: the user's cooldown
    acknowledged: int = 0  # a worker said "I'm reaching out"
    undeliverable: int = 0  # deliveries dropped: no topic can be formed for the recipient, or publishing failed


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        ledger: ConsentLedger,
        transport: Transport,
        *,
        clock: Clock,
        topics: Topics | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
        policy: EscalationPolicy | None = None,
        alert_expiry_s: int = 24 * 3600,
        resend_after_s: float = 10.0,
        redeliver_window_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_delivered: Callable[[str, str], None] | None = None,
        observe_delivery_s: Callable[[float], None] | None = None,
    ) -> None:
        """``observe_delivery_s``: told, for each alert's first notice, the seconds from its
        raise to the broker's PUBACK (the engine's metrics)."""
        self.outbox = outbox
        self.ledger = ledger
        self.transport = transport
        self.clock = clock
        self.topics = topics or Topics()
        self.groups = dict(groups or {})
        self.policy = policy or EscalationPolicy()
        self.alert_expiry_s = alert_expiry_s
        self.resend_after_s = resend_after_s
        self.redeliver_window_s = redeliver_window_s
        self._mono = monotonic
        self._inflight: dict[int, _InFlight] = {}
        self._last_collect_mono = float("-inf")
        self._on_delivered = on_delivered
        self._observe_delivery_s = observe_delivery_s
        self.stats = DispatchStats()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        outbox: Outbox,
        ledger: ConsentLedger,
        transport: Transport,
        *,
        clock: Clock,
        observe_delivery_s: Callable[[float], None] | None = None,
    ) -> Dispatcher:
        """The dispatcher every caller builds (engine, demo, replay): groups, escalation policy,
        expiry and re-send delay from ``settings``."""
        a = settings.alerts
        return cls(
            outbox,
            ledger,
            transport,
            clock=clock,
            topics=Topics(settings.mqtt.prefix),
            groups=settings.groups,
            policy=EscalationPolicy(a.escalate_after_s, a.renotify_after_s, a.max_reminders, a.cooldown_s, a.checkin_cooldown_s),
            alert_expiry_s=settings.mqtt.alert_expiry_s,
            resend_after_s=a.resend_after_s,
            observe_delivery_s=observe_delivery_s,
        )

    # -- raising -----------------------------------------------------------------------
    def raise_alert(self, d: AlertDecision, *, publish: bool = True) -> AlertRecord:
        """Record the detector's decision (idempotent on ``alert_id``) and queue its first notice;
        with ``publish``, publish it now (the gate ran in this call)."""
        return self.raise_alerts([d], publish=publish)[0]

    def raise_alerts(self, decisions: list[AlertDecision], *, publish: bool = True) -> list[AlertRecord]:
        """:meth:`raise_alert` for several decisions (one detector output) in one transaction."""
        now = self.clock()
        out: list[AlertRecord] = []
        ready: list[tuple[Delivery, Alert]] = []
        with self.outbox.transaction():  # raised and first notices queued: one commit
            for d in decisions:
                new = self.outbox.record_raised(d, now)
                rec = self.outbox.get(d.alert_id)
                assert rec is not None
                self.outbox.enqueued = []
                payload: Alert | None = None
                if new:
                    self.stats.raised += 1
                    # a check-in and a detector alert each have their own cooldown: neither silences the other
                    checkin = Reason.SELF_REPORT in d.reasons
                    cooldown = self.policy.checkin_cooldown_s if checkin else self.policy.cooldown_s
                    last = self.outbox.last_sent_at(d.user, excluding=d.alert_id, self_report=checkin) if cooldown else None
                    if last is not None and (now - last).total_seconds() < cooldown:
                        rec = self.outbox.save(apply(rec, Suppressed(now)), "suppressed", now, detail="cooldown")
                        self.stats.suppressed += 1
                    else:
                        rec, payload = self._first_notice(rec, d, now)
                if payload is not None:
                    ready.extend((dl, payload) for dl in self.outbox.enqueued)
                out.append(rec)
        if publish and ready:
            # The gate ran in this call, on this thread, just now: publish without another read.
            mono = self._mono()
            for dl, payload in ready:
                self._publish(dl, payload, mono)
            # PUBACKs are recorded in batches (one commit for many), not after every publish
            if mono - self._last_collect_mono > 0.05 or len(self._inflight) > 500:
                self.collect_acks()
        return out

    def _publish(self, dl: Delivery, payload: Alert, mono: float) -> None:
        try:
            topic = self.topics.alerts(dl.worker)
        except ValueError:
            # A recipient id no topic can carry (stored before ids were checked): drop this one
            # delivery and say so; the others, and every later start, go on (never a crash loop).
            self._undeliverable(dl, "invalid_recipient")
            return
        receipt = self.transport.publish(topic, alert_wire(payload, notice=dl.notice), qos=1, expiry_s=self.alert_expiry_s)
        self._inflight[dl.id] = _InFlight(receipt, mono, dl.alert_id, dl.worker, dl.queued_at if dl.notice == 0 else None)
        self.stats.published += 1

    def _undeliverable(self, dl: Delivery, reason: str) -> None:
        self.outbox.drop_delivery(dl.id, reason)
        self.stats.undeliverable += 1
        log.warning("alert %s: a delivery was dropped (%s)", dl.alert_id, reason)

    def _first_notice(self, rec: AlertRecord, d: AlertDecision, now: datetime) -> tuple[AlertRecord, Alert | None]:
        gate = decide(self.ledger.state(d.user), d, now, queued_at=rec.queued_at)
        if gate.deferred and gate.retry_at is not None:
            deferred = apply(rec, Deferred(gate.verdict.value, gate.retry_at))
            return self.outbox.save(deferred, "deferred", now, detail=gate.verdict.value), None
        steps = route(gate.recipients, self.groups) if gate.allowed else []
        if not steps:
            verdict = gate.verdict.value if not gate.allowed else Verdict.WITHHELD_NO_RECIPIENT.value
            self.stats.withheld += 1
            return self.outbox.save(apply(rec, Withheld(verdict, now)), "withheld", now, detail=verdict), None
        due = first_due(self.policy, len(steps), 0, now)
        nxt = apply(rec, Sent(steps[0], now, 0, False, due))
        return self.outbox.save(nxt, "sent", now, detail=",".join(steps[0]), enqueue=steps[0]), gate.payload

    # -- publishing --------------------------------------------------------------------
    def pump(self) -> int:
        """Record PUBACKs, then publish every pending delivery the gate allows now. Returns how
        many were published."""
        self.collect_acks()
        now = self.clock()
        mono = self._mono()
        for did, f in list(self._inflight.items()):
            if mono - f.sent_mono > self.resend_after_s:  # no PUBACK: publish again, same alert_id
                del self._inflight[did]
                self.stats.republished += 1
        published = 0
        for dl in self.outbox.pending(exclude=len(self._inflight)):
            if dl.id in self._inflight:
                continue
            try:
                decision = self.outbox.decision(dl.alert_id)
                gate = decide(self.ledger.state(dl.user), decision, now, queued_at=dl.queued_at)  # SPEC: consent at send time
                if not gate.allowed:
                    self._not_now(dl.alert_id, gate.verdict, gate.retry_at, now)
                    continue
                assert gate.payload is not None
                self._publish(dl, gate.payload, mono)
            except TransportError:
                raise  # the broker, not this delivery: it stays pending
            except Exception as exc:  # noqa: BLE001 - a stored delivery must not stop the others
                self._undeliverable(dl, f"error_{type(exc).__name__}")
                continue
            published += 1
        self.collect_acks()
        return published

    def _not_now(self, alert_id: str, verdict: Verdict, retry_at: datetime | None, now: datetime) -> None:
        rec = self.outbox.get(alert_id)
        if rec is None:
            return
        if verdict is Verdict.DEFERRED_QUIET_HOURS and retry_at is not None:
            if rec.due_at != retry_at and rec.state in (AlertState.RAISED, AlertState.DELIVERED, AlertState.ESCALATED):
                self.outbox.save(apply(rec, Deferred(verdict.value, retry_at)), "deferred", now, detail=verdict.value)
            return  # stays pending; published once quiet hours end
        self.outbox.drop_pending(alert_id, verdict.value)
        if rec.state in (AlertState.RAISED, AlertState.DELIVERED, AlertState.ESCALATED):
            after = apply(rec, Withheld(verdict.value, now))
            if rec.state is AlertState.RAISED:
                self.stats.withheld += 1
                self.outbox.save(after, "withheld", now, detail=verdict.value)
            else:  # already in the worker's hands (or the broker's queue for them): say so
                self.outbox.save(after, "stopped", now, detail=f"{after.verdict}; delivered before to {','.join(rec.targets)}")

    def collect_acks(self) -> int:
        """Mark deliveries the broker acknowledged; the alert becomes ``delivered``."""
        self._last_collect_mono = self._mono()
        done = [(did, f) for did, f in self._inflight.items() if f.receipt.is_published()]
        if not done:
            return 0
        now = self.clock()
        with self.outbox.transaction():  # every PUBACK seen since the last call: one commit
            self.outbox.mark_delivered([did for did, _ in done], now)
            for did, f in done:
                del self._inflight[did]
                rec = self.outbox.get(f.alert_id)
                if rec is not None and rec.state is AlertState.RAISED:
                    self.outbox.save(apply(rec, Delivered(f.worker, now)), "delivered", now, actor=f.worker)
        if self._on_delivered:
            for _, f in done:
                self._on_delivered(f.alert_id, f.worker)
        if self._observe_delivery_s:
            for _, f in done:
                if f.first_queued_at is not None:
                    self._observe_delivery_s(max(0.0, (now - f.first_queued_at).total_seconds()))
        self.stats.delivered += len(done)
        return len(done)

    def connection_lost(self) -> int:
        """The broker connection dropped: publish again what it acknowledged just before.

        A broker killed right after its PUBACK may not yet have saved the message for the
        worker's session (Mosquitto saves after the acknowledgement), so deliveries
        acknowledged within ``redeliver_window_s`` before the loss are pending again and go
        out once more, same ``alert_id`` (the worker's client drops the duplicate). Measured
        here: without this, a broker SIGKILL mid-stream lost an acknowledged alert.
        """
        self.collect_acks()
        since = self.clock() - timedelta(seconds=self.redeliver_window_s)
        n = self.outbox.reopen_delivered(since)
        self._inflight.clear()  # whatever was in flight is published again, from the outbox
        self.stats.republished += n
        return n

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every publish is acknowledged (shutdown); True if all were."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            self.collect_acks()
            time.sleep(0.01)
        return not self._inflight

    # -- scheduling --------------------------------------------------------------------
    def run_due(self) -> int:
        """Act on alerts whose time has come: quiet hours over, escalation, reminder."""
        now = self.clock()
        n = 0
        for rec in self.outbox.due(now):
            try:
                n += self._act_on_due(rec, now)
            except TransportError:
                raise
            except Exception as exc:  # noqa: BLE001 - one stored alert must not stop the others
                log.warning("alert %s: scheduled step failed (%s); not scheduled again", rec.alert_id, type(exc).__name__)
                self.outbox.save(replace(rec, due_at=None), "error", now, detail=type(exc).__name__)
        if n:
            self.pump()
        return n

    def _act_on_due(self, rec: AlertRecord, now: datetime) -> int:
        """One due alert: first notice after quiet hours, escalation, reminder; 1 if sent."""
        d = self.outbox.decision(rec.alert_id)
        if rec.state is AlertState.RAISED and not rec.targets:
            self._first_notice(rec, d, now)  # queued; the pump publishes it
            return 1
        gate = decide(self.ledger.state(rec.user), d, now, queued_at=rec.queued_at)
        if not gate.allowed:
            self._not_now(rec.alert_id, gate.verdict, gate.retry_at, now)
            return 0
        steps = route(gate.recipients, self.groups)
        act = next_action(rec, steps, self.policy, now)
        if isinstance(act, Escalate):
            due = first_due(self.policy, len(steps), act.step, now)
            nxt = apply(rec, Sent(act.workers, now, act.step, False, due))
            self.outbox.save(nxt, "escalated", now, detail=",".join(act.workers), enqueue=act.workers)
            return 1
        if isinstance(act, Remind):
            nxt_due = None
            if rec.reminders + 1 < self.policy.max_reminders:
                nxt_due = now + timedelta(seconds=self.policy.renotify_after_s)
            nxt = apply(rec, Sent((), now, rec.step, True, nxt_due))
            self.outbox.save(nxt, "reminded", now, detail=",".join(rec.targets), enqueue=rec.targets)
            return 1
        # Not yet delivered (broker away) or nothing left to do: look again later or never.
        later = now + timedelta(seconds=self.policy.escalate_after_s) if rec.state is AlertState.RAISED else None
        self.outbox.save(replace(rec, due_at=later), "scheduled", now)
        return 0

    # -- acks from workers -------------------------------------------------------------
    def on_ack(self, worker: str, payload: bytes, *, topic: str = "acks") -> AlertRecord:
        """Record a worker's ack or resolve; :class:`ParseError` or :class:`LifecycleError` if it
        does not apply (the engine logs and ignores those)."""
        msg = AckMessage.decode(payload, topic=topic)
        rec = self.outbox.get(msg.alert_id)
        if rec is None:
            raise LifecycleError(f"unknown alert {msg.alert_id}")
        now = self.clock()
        if msg.action is AckAction.ACK:
            rec = self.outbox.save(apply(rec, Acknowledged(worker, now)), "acknowledged", now, actor=worker)
            self.stats.acknowledged += 1
            return rec
        assert msg.outcome is not None
        nxt = apply(rec, Resolved(worker, msg.outcome, now, msg.note))
        return self.outbox.save(nxt, "resolved", now, actor=worker, detail=msg.outcome.value)


__all__ = ["DispatchStats", "Dispatcher"]
