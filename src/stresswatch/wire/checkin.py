"""The check-in message on ``{prefix}/checkin/{user}`` (QoS 1): the person asks for contact.

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "checkin_id": "<uuid>", "user": "alice", "at": "2026-12-01T15:00:00+00:00",
     "level": "elevated", "note": "could someone call after 6?"}

Decoding is strict (one :class:`~stresswatch.errors.WireError` naming the field and a reason,
never a value from the payload, never anything else): the id is a UUID (the engine
de-duplicates by it), ``user`` is an id by the id grammar and must be the topic's user (the
broker lets a person write only their own topic), ``at`` is timezone-aware and within
``[now - MAX_AGE_S, now + MAX_SKEW_S]`` (a check-in queued offline for longer is stale: the
companion says so instead of sending it), ``level`` is an alert level, and the note is at
most ``NOTE_MAX`` characters without control characters.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from ..errors import WireError
from ..model import AlertLevel
from .json import checked_id, decode_json, refuse

MAX_AGE_S = 24 * 3600
MAX_SKEW_S = 300
NOTE_MAX = 280
MAX_CHECKIN_BYTES = 4_096 + 6 * NOTE_MAX


class CheckinMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    checkin_id: str = Field(min_length=36, max_length=36)
    user: str
    at: AwareDatetime
    level: AlertLevel = AlertLevel.ELEVATED
    note: str | None = Field(default=None, max_length=NOTE_MAX)

    @field_validator("checkin_id")
    @classmethod
    def _uuid(cls, v: str) -> str:
        try:
            return str(uuid.UUID(v))
        except ValueError:
            raise refuse("bad_id", "not a UUID") from None

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        return checked_id("user", v)

    @field_validator("note")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in v):
            raise refuse("malformed", "control characters are not allowed")
        return v or None

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def decode_checkin(payload: bytes, *, topic_user: str, now: datetime, topic: str = "checkin") -> CheckinMessage:
    """The check-in ``payload`` sent on ``topic_user``'s topic, checked against ``now``."""
    msg = decode_json(CheckinMessage, payload, source=topic, max_bytes=MAX_CHECKIN_BYTES)
    if msg.user != topic_user:
        raise WireError("check-in for another user than the topic's", reason="wrong_user", source=topic, field="user")
    if msg.at < now - timedelta(seconds=MAX_AGE_S):
        raise WireError(f"check-in older than {MAX_AGE_S // 3600} h", reason="time_range", source=topic, field="at")
    if msg.at > now + timedelta(seconds=MAX_SKEW_S):
        raise WireError("check-in time is in the future", reason="time_range", source=topic, field="at")
    return msg


__all__ = ["MAX_AGE_S", "MAX_SKEW_S", "NOTE_MAX", "CheckinMessage", "decode_checkin"]
