"""The alert lifecycle as a pure state machine, and the escalation policy.

States (SPEC: raised -> delivered -> acknowledged -> resolved, or escalated)::

    raised --Delivered--> delivered --Acknowledged(w)--> acknowledged --Resolved(w, outcome)--> resolved
       |                      |  \\--Escalated/Reminded--> escalated --Acknowledged(w)--> ...
       |                      \\--Resolved(w, outcome)--> resolved      (resolving implies acknowledging)
       +--Withheld(verdict)--> withheld     (consent said no at send time; also stops escalation;
       |                                     from delivered/escalated the verdict reads stopped_...)
       +--Suppressed--------> suppressed    (engine cooldown: the user was alerted about moments ago)

:func:`apply` never does I/O: ``(record, event) -> record`` or :class:`LifecycleError`.
:func:`next_action` is the escalation policy: ``(record, route, policy, now) -> action | None``.
Escalation never leaves the set of workers the user consented to: it walks the user's own
ordered list of recipients (a worker, then a group, ...) and then re-notifies.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ..errors import StresswatchError


class LifecycleError(StresswatchError):
    """An event that does not apply to the alert in its current state (ignored by the engine)."""


class AlertState(str, enum.Enum):
    RAISED = "raised"
    DELIVERED = "delivered"
    ESCALATED = "escalated"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    WITHHELD = "withheld"
    SUPPRESSED = "suppressed"


OPEN_STATES = (AlertState.RAISED, AlertState.DELIVERED, AlertState.ESCALATED)


class Outcome(str, enum.Enum):
    REACHED_OUT = "reached_out"
    NO_ANSWER = "no_answer"
    NOT_NEEDED = "not_needed"


@dataclass(frozen=True)
class AlertRecord:
    alert_id: str
    user: str
    state: AlertState = AlertState.RAISED
    verdict: str | None = None  # the gate's last verdict
    step: int = 0  # index into the route of the last step notified
    reminders: int = 0
    targets: tuple[str, ...] = ()  # every worker notified so far
    last_sent_at: datetime | None = None
    due_at: datetime | None = None  # when the scheduler should look at it next
    acked_by: str | None = None
    acked_at: datetime | None = None
    outcome: Outcome | None = None
    note: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    queued_at: datetime | None = None  # when the engine raised it (wall clock)

    @property
    def notice(self) -> int:
        """0 for the first notice; grows with each escalation or reminder (same alert_id)."""
        return self.step + self.reminders


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    """Deliveries to ``workers`` were queued in the outbox (first notice, escalation or reminder)."""

    workers: tuple[str, ...]
    at: datetime
    step: int = 0
    reminder: bool = False
    due_at: datetime | None = None


@dataclass(frozen=True)
class Delivered:
    worker: str
    at: datetime


@dataclass(frozen=True)
class Acknowledged:
    worker: str
    at: datetime


@dataclass(frozen=True)
class Resolved:
    worker: str
    outcome: Outcome
    at: datetime
    note: str | None = None


@dataclass(frozen=True)
class Withheld:
    verdict: str
    at: datetime


@dataclass(frozen=True)
class Deferred:
    verdict: str
    until: datetime


@dataclass(frozen=True)
class Suppressed:
    at: datetime


Event = Sent | Delivered | Acknowledged | Resolved | Withheld | Deferred | Suppressed


def apply(rec: AlertRecord, ev: Event) -> AlertRecord:
    """The next record, or :class:`LifecycleError` if ``ev`` does not apply now."""
    s = rec.state
    if isinstance(ev, Sent):
        if s not in OPEN_STATES:
            raise LifecycleError(f"alert {rec.alert_id} is {s.value}: nothing more is sent")
        targets = tuple(dict.fromkeys((*rec.targets, *ev.workers)))
        escalating = ev.step > rec.step or ev.reminder
        return replace(
            rec,
            state=AlertState.ESCALATED if escalating else s,
            step=ev.step,
            reminders=rec.reminders + (1 if ev.reminder else 0),
            targets=targets,
            last_sent_at=ev.at,
            due_at=ev.due_at,
            verdict="send",
        )
    if isinstance(ev, Delivered):
        if ev.worker not in rec.targets:
            raise LifecycleError(f"alert {rec.alert_id} was not sent to {ev.worker}")
        return replace(rec, state=AlertState.DELIVERED) if s is AlertState.RAISED else rec
    if isinstance(ev, Acknowledged):
        _check_worker(rec, ev.worker)
        if s is AlertState.ACKNOWLEDGED:
            raise LifecycleError(f"alert {rec.alert_id} is already acknowledged by {rec.acked_by}")
        if s in (AlertState.RESOLVED, AlertState.SUPPRESSED):
            raise LifecycleError(f"alert {rec.alert_id} is {s.value}")
        return replace(rec, state=AlertState.ACKNOWLEDGED, acked_by=ev.worker, acked_at=ev.at, due_at=None)
    if isinstance(ev, Resolved):
        _check_worker(rec, ev.worker)
        if s in (AlertState.RESOLVED, AlertState.SUPPRESSED):
            raise LifecycleError(f"alert {rec.alert_id} is {s.value}")
        return replace(
            rec,
            state=AlertState.RESOLVED,
            acked_by=rec.acked_by or ev.worker,
            acked_at=rec.acked_at or ev.at,
            outcome=ev.outcome,
            note=ev.note,
            resolved_by=ev.worker,
            resolved_at=ev.at,
            due_at=None,
        )
    if isinstance(ev, Withheld):
        if s not in OPEN_STATES:
            raise LifecycleError(f"alert {rec.alert_id} is {s.value}")
        # A notice the broker already acknowledged cannot be recalled (MQTT has no unpublish):
        # the record says it was delivered and further notices stopped, not "withheld".
        verdict = ev.verdict
        if s in (AlertState.DELIVERED, AlertState.ESCALATED):
            verdict = "stopped_" + ev.verdict.removeprefix("withheld_")
        return replace(rec, state=AlertState.WITHHELD, verdict=verdict, due_at=None)
    if isinstance(ev, Deferred):
        if s not in OPEN_STATES:
            raise LifecycleError(f"alert {rec.alert_id} is {s.value}")
        return replace(rec, verdict=ev.verdict, due_at=ev.until)
    if isinstance(ev, Suppressed):
        if s is not AlertState.RAISED or rec.targets:
            raise LifecycleError(f"alert {rec.alert_id} was already sent")
        return replace(rec, state=AlertState.SUPPRESSED, verdict="suppressed_cooldown", due_at=None)
    raise TypeError(ev)


def _check_worker(rec: AlertRecord, worker: str) -> None:
    # Only a worker the alert was sent to may act on it (ids are unguessable UUIDs, but the
    # engine does not rely on that).
    if worker not in rec.targets:
        raise LifecycleError(f"alert {rec.alert_id} was not sent to {worker}")


# -- routing and escalation policy --------------------------------------------------------
def route(recipients: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """The user's ordered recipients as steps of workers: a group is all its members.

    A worker already notified in an earlier step is not repeated; empty steps are skipped.
    """
    steps: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for entry in recipients:
        members = tuple(groups[entry]) if entry in groups else (entry,)
        fresh = tuple(w for w in dict.fromkeys(members) if w not in seen)
        seen.update(fresh)
        if fresh:
            steps.append(fresh)
    return steps


@dataclass(frozen=True)
class EscalationPolicy:
    escalate_after_s: int = 900  # not acknowledged this long after a notice: next step
    renotify_after_s: int = 900  # after the last step: remind everyone notified, this often
    max_reminders: int = 2
    cooldown_s: int = 1800  # wall clock between two alerts sent about the same user
    checkin_cooldown_s: int = 300  # the same, between two check-ins (`stresswatch checkin`) of one person


@dataclass(frozen=True)
class Escalate:
    step: int
    workers: tuple[str, ...]


@dataclass(frozen=True)
class Remind:
    workers: tuple[str, ...]


def first_due(policy: EscalationPolicy, n_steps: int, step: int, now: datetime) -> datetime:
    wait = policy.escalate_after_s if step + 1 < n_steps else policy.renotify_after_s
    return now + timedelta(seconds=wait)


def next_action(
    rec: AlertRecord, steps: Sequence[tuple[str, ...]], policy: EscalationPolicy, now: datetime
) -> Escalate | Remind | None:
    """What the scheduler does for an unacknowledged alert at ``now`` (pure)."""
    if rec.state not in (AlertState.DELIVERED, AlertState.ESCALATED) or rec.last_sent_at is None:
        return None
    if rec.step + 1 < len(steps):
        if now >= rec.last_sent_at + timedelta(seconds=policy.escalate_after_s):
            return Escalate(rec.step + 1, steps[rec.step + 1])
        return None
    if rec.reminders < policy.max_reminders and now >= rec.last_sent_at + timedelta(seconds=policy.renotify_after_s):
        return Remind(rec.targets)
    return None
