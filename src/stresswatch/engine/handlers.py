"""The engine's handler for each message kind it subscribes to (``{prefix}/{kind}/+``), run on
the engine thread. A fault escaping one is kept to the message's id (:mod:`.routing`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..alerts import checkin, replies
from ..errors import ParseError, WireError
from ..wire.acks import AckMessage
from ..wire.consent import decode_consent

if TYPE_CHECKING:
    from .service import Engine

log = logging.getLogger("stresswatch.engine")


def on_consent(engine: Engine, user: str, payload: bytes, topic: str) -> None:
    if not payload:  # an empty retained message: the user erased their data
        engine.erase_user(user)
        return
    try:
        events = decode_consent(payload, topic_user=user, topic=topic, now=engine.clock(), window=engine.settings.engine.time_window())
    except WireError as exc:
        engine.rejections.record("consent", exc, user=user)
        return
    engine.consent.drop(user)
    if engine.ledger.extend(events):
        now = engine.clock()
        state = engine.consent.state(user)
        if not state.allows_processing(now):
            engine.forget(user)
        elif user in engine.pipeline.zones:  # a new grant may move the person's zone (travel)
            engine.pipeline.place(user, state)
        engine.status.update(user, now)


def on_ack(engine: Engine, worker: str, payload: bytes, topic: str) -> None:
    """An ack, resolve or list request: act, then tell the worker what was recorded. What is
    not recorded is counted (one log line per reason a minute), not logged per message."""
    assert engine.dispatcher is not None and engine.transport is not None
    reply = replies.answer(engine.dispatcher, worker, payload, topic=topic)
    if not reply.ok:
        try:
            AckMessage.decode(payload, topic=topic)
        except WireError as exc:
            engine.rejections.record("ack", exc, user=worker)
        else:  # a valid message that does not apply (unknown alert, not theirs, wrong state)
            engine.rejections.record("ack", "not_applicable", user=worker, field_name="alert_id")
    engine.transport.publish(engine.topics.replies(worker), reply.encode(), qos=1, expiry_s=replies.REPLY_EXPIRY_S)


def on_checkin(engine: Engine, user: str, payload: bytes, topic: str) -> None:
    """The person asked for contact: the same dispatcher (and consent gate) as a detector alert."""
    assert engine.dispatcher is not None
    try:
        decision = checkin.decision_for(user, payload, now=engine.clock(), topic=topic)
    except ParseError as exc:
        engine.rejections.record("checkin", exc, user=user)
        return
    engine.dispatcher.raise_alerts([decision])


__all__ = ["on_ack", "on_checkin", "on_consent"]
