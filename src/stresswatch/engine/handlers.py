"""The engine's handler for each message kind it subscribes to (``{prefix}/{kind}/+``), run on
the engine thread. A fault escaping one is kept to the message's id (:mod:`.routing`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..alerts import checkin, replies
from ..consent.wire import decode_consent
from ..errors import ParseError

if TYPE_CHECKING:
    from .service import Engine

log = logging.getLogger("stresswatch.engine")


def on_consent(engine: Engine, user: str, payload: bytes, topic: str) -> None:
    if not payload:  # an empty retained message: the user erased their data
        engine.erase_user(user)
        return
    try:
        events = decode_consent(payload, topic_user=user, topic=topic)
    except ParseError as exc:
        log.warning("ignored consent message: %s", exc)
        return
    engine.consent.drop(user)
    if engine.ledger.extend(events):
        now = engine.clock()
        if not engine.consent.may_process(user, now):
            engine.forget(user)
        engine.status.update(user, now)


def on_ack(engine: Engine, worker: str, payload: bytes, topic: str) -> None:
    """An ack, resolve or list request: act, then tell the worker what was recorded."""
    assert engine.dispatcher is not None and engine.transport is not None
    reply = replies.answer(engine.dispatcher, worker, payload, topic=topic)
    if not reply.ok:
        log.warning("ack from %s: %s", worker, reply.error)
    engine.transport.publish(engine.topics.replies(worker), reply.encode(), qos=1, expiry_s=replies.REPLY_EXPIRY_S)


def on_checkin(engine: Engine, user: str, payload: bytes, topic: str) -> None:
    """The person asked for contact: the same dispatcher (and consent gate) as a detector alert."""
    assert engine.dispatcher is not None
    try:
        decision = checkin.decision_for(user, payload, now=engine.clock(), topic=topic)
    except ParseError as exc:
        log.warning("ignored check-in: %s", exc)
        return
    engine.dispatcher.raise_alerts([decision])


__all__ = ["on_ack", "on_checkin", "on_consent"]
