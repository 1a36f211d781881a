"""The engine's answers to a worker, on ``{prefix}/replies/{worker}`` (QoS 1).

Every message a worker sends on its acks topic (ack, resolve, list; :mod:`.acks`) gets one
:class:`Reply` quoting its ``request_id``: what the engine *recorded* (the alert's state
after the ack, or why nothing was recorded), or the worker's alerts from the outbox. The
broker lets a worker read only its own replies topic, and the engine lists only alerts that
were sent to that worker (itself or as a member of a group), so a worker never learns about
another worker's alert; an unknown id and another worker's id get the same answer.

What a view shows follows the person's consent *now* (:func:`view_of`): the name they chose
and, only if they allow it, level and reasons; never the score or any physiological value.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from ..consent.state import ConsentState, Status, Visibility
from ..errors import ParseError, TransportError
from ..model import AlertDecision, AlertLevel, Reason
from ..wire.acks import AckAction, AckMessage
from .lifecycle import OPEN_STATES, AlertRecord, AlertState, LifecycleError, Outcome
from .topics import Topics

REPLY_EXPIRY_S = 3600  # a reply nobody read within an hour is of no use to anyone


class AlertView(BaseModel):
    """One alert as the worker may see it, with the state the engine recorded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alert_id: str
    user: str = Field(description="the name the person chose to be shown as")
    level: AlertLevel | None = None
    reasons: list[Reason] = Field(default_factory=list)
    note: str | None = Field(default=None, description="a check-in: the person's own words")
    raised_at: datetime
    state: AlertState
    escalation_due_at: datetime | None = Field(default=None, description="open alerts: when the next recipient or a reminder is due")
    acked_by: str | None = None
    acked_at: datetime | None = None
    outcome: Outcome | None = None
    resolution_note: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    request_id: str | None = None
    action: AckAction | None = None
    ok: bool
    error: str | None = None
    alert: AlertView | None = None
    alerts: list[AlertView] | None = None

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Reply:
        from ..wire.json import decode_json

        return decode_json(cls, payload, source="replies")


def view_of(rec: AlertRecord, decision: AlertDecision, consent: ConsentState | None) -> AlertView:
    """Pure: the worker's view of one alert under the person's current consent (withdrawn
    consent hides the chosen name and every detail, also in history)."""
    granted = consent is not None and consent.status in (Status.ACTIVE, Status.PAUSED)
    detail = granted and consent.visibility in (Visibility.LEVEL_AND_REASONS, Visibility.LEVEL_REASONS_AND_SCORE)
    return AlertView(
        alert_id=rec.alert_id,
        user=(consent.display_name if granted and consent.display_name else "a person you support"),
        level=decision.level if detail else None,
        reasons=list(decision.reasons) if detail else [],
        note=decision.note if granted else None,
        raised_at=decision.raised_at,
        state=rec.state,
        escalation_due_at=rec.due_at if rec.state in OPEN_STATES else None,
        acked_by=rec.acked_by,
        acked_at=rec.acked_at,
        outcome=rec.outcome,
        resolution_note=rec.note,
        resolved_by=rec.resolved_by,
        resolved_at=rec.resolved_at,
    )


def _request_id_of(payload: bytes) -> str | None:
    """The request id of a message that did not validate, so the error still finds its asker."""
    try:
        rid = json.loads(payload).get("request_id")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 and rid.replace("-", "").replace("_", "").isalnum() else None


def answer(dispatcher: object, worker: str, payload: bytes, *, topic: str = "acks") -> Reply:
    """Engine side: act on one message from ``worker`` and say what was recorded (never raises
    for bad input). ``dispatcher`` is the engine's :class:`~.dispatch.Dispatcher`."""
    from .dispatch import Dispatcher

    assert isinstance(dispatcher, Dispatcher)
    try:
        msg = AckMessage.decode(payload, topic=topic)
    except ParseError as exc:
        return Reply(request_id=_request_id_of(payload), ok=False, error=f"not recorded: {exc}")
    outbox, ledger = dispatcher.outbox, dispatcher.ledger
    consent: dict[str, ConsentState] = {}

    def view(rec: AlertRecord) -> AlertView:
        if rec.user not in consent:
            consent[rec.user] = ledger.state(rec.user)
        return view_of(rec, outbox.decision(rec.alert_id), consent[rec.user])

    if msg.action is AckAction.LIST:
        recs = outbox.records_for_worker(worker, states=tuple(msg.states) if msg.states else None, limit=msg.limit)
        return Reply(request_id=msg.request_id, action=msg.action, ok=True, alerts=[view(r) for r in recs])
    assert msg.alert_id is not None
    rec = outbox.get(msg.alert_id)
    if rec is None or worker not in rec.targets:  # the same answer: no probing of other workers' ids
        return Reply(request_id=msg.request_id, action=msg.action, ok=False, error=f"not recorded: no alert {msg.alert_id} for {worker}")
    try:
        rec = dispatcher.on_ack(worker, payload, topic=topic)
    except LifecycleError as exc:
        return Reply(request_id=msg.request_id, action=msg.action, ok=False, error=f"not recorded: {exc}", alert=view(rec))
    return Reply(request_id=msg.request_id, action=msg.action, ok=True, alert=view(rec))


# -- the worker's side -------------------------------------------------------------------------
class ReplyWaiter:
    """Matches replies to requests by ``request_id`` (feed it every message of the replies topic)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[Reply]]] = {}

    def expect(self) -> str:
        rid = uuid.uuid4().hex
        with self._lock:
            self._waiting[rid] = (threading.Event(), [])
        return rid

    def feed(self, payload: bytes) -> Reply | None:
        """Record one reply; returns it (None if it does not parse)."""
        try:
            reply = Reply.decode(payload)
        except ParseError:
            return None
        with self._lock:
            slot = self._waiting.get(reply.request_id or "")
        if slot is not None:
            slot[1].append(reply)
            slot[0].set()
        return reply

    def wait(self, rid: str, timeout_s: float) -> Reply:
        with self._lock:
            ev, box = self._waiting[rid]
        try:
            if not ev.wait(timeout_s):
                raise TransportError(
                    f"the engine did not answer within {timeout_s:g} s: nothing is known to be recorded"
                    " (is the engine running? the request stays queued for it)"
                )
            return box[0]
        finally:
            with self._lock:
                self._waiting.pop(rid, None)


def wait_published(info: object, timeout_s: float) -> None:
    """Wait for the broker's PUBACK of one publish (paho's ``MQTTMessageInfo``), or TransportError."""
    try:
        info.wait_for_publish(timeout_s)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError) as exc:
        raise TransportError(f"not acknowledged by the broker: {exc}") from None
    if not info.is_published():  # type: ignore[attr-defined]
        raise TransportError(f"not acknowledged by the broker within {timeout_s:g} s")


def request(
    url: str,
    worker: str,
    msg: AckMessage,
    *,
    topics: Topics | None = None,
    username: str | None = None,
    password: str | None = None,
    protocol: str = "auto",
    timeout_s: float = 10.0,
) -> Reply:
    """One-shot: send ``msg`` as ``worker`` and return the engine's :class:`Reply`.

    Subscribes to the worker's replies topic before publishing (its own clean session, so a
    running ``alerts watch`` is not disturbed). :class:`TransportError` if the broker refuses
    the account, the topic or the publish, or if the engine does not answer in time.
    """
    from .transport import connect as mqtt_connect

    topics = topics or Topics()
    waiter = ReplyWaiter()
    rid = waiter.expect()
    msg = msg.model_copy(update={"request_id": rid})
    client = mqtt_connect(
        url, f"stresswatch-worker-{worker}-{rid[:8]}", username=username, password=password, protocol=protocol,
        on_message=lambda c, u, m: waiter.feed(m.payload),
    )  # fmt: skip
    try:
        granted: list[object] = []
        subscribed = threading.Event()

        def on_subscribe(c: object, u: object, mid: int, codes: list[object], props: object = None) -> None:
            granted.extend(codes)
            subscribed.set()

        client.on_subscribe = on_subscribe
        client.subscribe(topics.replies(worker), qos=1)
        if not subscribed.wait(timeout_s):
            raise TransportError(f"no SUBACK for {topics.replies(worker)!r}", url=url.split("@")[-1])
        if any(getattr(c, "is_failure", False) or c == 128 for c in granted):
            raise TransportError(f"the broker does not let this account read {worker}'s replies: not authorised as {worker}")
        refused: list[str] = []
        client.on_publish = lambda c, u, mid, reason=None, props=None: (
            refused.append(str(reason)) if getattr(reason, "is_failure", False) else None
        )
        wait_published(client.publish(topics.acks(worker), msg.encode(), qos=1), timeout_s)
        if refused:
            raise TransportError(f"the broker refused the message on {topics.acks(worker)!r}: {refused[0]}")
        return waiter.wait(rid, timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()


__all__ = ["AlertView", "Reply", "ReplyWaiter", "answer", "request", "view_of"]
