"""The ack message a support worker sends back on ``{prefix}/acks/{worker}`` (QoS 1).

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "alert_id": "…", "action": "ack"}
    {"schema_version": 1, "alert_id": "…", "action": "resolve", "outcome": "reached_out", "note": "called, OK"}

The worker is the topic's last level (the broker's ACL lets a worker write only its own).
Checked here: ``alert_id`` by the id grammar, ``note`` at most 500 characters without control
characters other than line breaks and tabs, the payload at most a few kB.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .ids import ID_RULE, is_valid_id
from .json import decode_json, refuse
from .limits import MAX_ACK_BYTES, MAX_NOTE_CHARS


class AckAction(str, enum.Enum):
    ACK = "ack"
    RESOLVE = "resolve"


class Outcome(str, enum.Enum):
    """How a worker resolved an alert (the lifecycle's vocabulary, defined with the message)."""

    REACHED_OUT = "reached_out"
    NO_ANSWER = "no_answer"
    NOT_NEEDED = "not_needed"


class AckMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    alert_id: str
    action: AckAction
    outcome: Outcome | None = None
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)

    @field_validator("alert_id")
    @classmethod
    def _alert_id(cls, v: str) -> str:
        if not is_valid_id(v):
            raise refuse("bad_id", f"alert id must be {ID_RULE}")
        return v

    @field_validator("note")
    @classmethod
    def _note(cls, v: str | None) -> str | None:
        if v is not None and not v.replace("\n", " ").replace("\t", " ").isprintable():
            raise refuse("malformed", "must not contain control characters")
        return v

    @model_validator(mode="after")
    def _resolve_needs_outcome(self) -> AckMessage:
        if self.action is AckAction.RESOLVE and self.outcome is None:
            raise ValueError("resolve needs an outcome")
        if self.action is AckAction.ACK and (self.outcome is not None or self.note is not None):
            raise ValueError("ack carries no outcome or note")
        return self

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, payload: bytes, *, topic: str = "acks") -> AckMessage:
        """:class:`~stresswatch.errors.WireError` naming the field when malformed or out of range."""
        return decode_json(cls, payload, source=topic, max_bytes=MAX_ACK_BYTES)


__all__ = ["AckAction", "AckMessage", "Outcome"]
