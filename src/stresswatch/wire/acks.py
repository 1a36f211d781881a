"""What a support worker sends on ``{prefix}/acks/{worker}`` (QoS 1).

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "alert_id": "…", "action": "ack", "request_id": "…"}
    {"schema_version": 1, "alert_id": "…", "action": "resolve", "outcome": "reached_out", "note": "called, OK"}
    {"schema_version": 1, "action": "list", "request_id": "…", "states": ["delivered", "escalated"]}

The worker is the topic's last level (the broker's ACL lets a worker write only its own).
The engine answers each message on ``{prefix}/replies/{worker}`` with what it recorded,
quoting ``request_id`` (:mod:`stresswatch.alerts.replies`). Checked here: ``alert_id`` a
UUID, ``note`` at most 500 characters without control characters other than line breaks and
tabs, the payload at most a few kB; a refusal names the field and the rule, never the value.
"""

from __future__ import annotations

import enum
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..alerts.lifecycle import AlertState, Outcome
from .json import decode_json, refuse
from .limits import MAX_ACK_BYTES, MAX_NOTE_CHARS


class AckAction(str, enum.Enum):
    ACK = "ack"
    RESOLVE = "resolve"
    LIST = "list"  # the worker's alerts (history), answered from the engine's outbox


def check_alert_id(value: str) -> str:
    """Alert ids are UUIDs (model.alert_id_for): anything else is refused before it travels."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"alert id {value!r} is not a UUID (copy it from `stresswatch alerts list`)") from None


class AckMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    alert_id: str | None = Field(default=None, min_length=1, max_length=64)
    action: AckAction
    outcome: Outcome | None = None
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    request_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    states: list[AlertState] | None = Field(default=None, max_length=len(AlertState))
    limit: int = Field(default=200, ge=1, le=1000)

    @field_validator("alert_id")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        try:
            return check_alert_id(v) if v is not None else None
        except ValueError:  # its message repeats the value: say the rule instead
            raise refuse("bad_id", "alert id must be a UUID") from None

    @field_validator("note")
    @classmethod
    def _note(cls, v: str | None) -> str | None:
        if v is not None and not v.replace("\n", " ").replace("\t", " ").isprintable():
            raise refuse("malformed", "must not contain control characters")
        return v

    @model_validator(mode="after")
    def _fields_fit_action(self) -> AckMessage:
        if self.action is AckAction.LIST:
            if self.alert_id is not None or self.outcome is not None or self.note is not None:
                raise ValueError("list carries no alert_id, outcome or note")
            return self
        if self.alert_id is None:
            raise ValueError(f"{self.action.value} needs an alert_id")
        if self.states is not None:
            raise ValueError(f"{self.action.value} carries no states")
        if self.action is AckAction.RESOLVE and self.outcome is None:
            raise ValueError("resolve needs an outcome")
        if self.action is AckAction.ACK and (self.outcome is not None or self.note is not None):
            raise ValueError("ack carries no outcome or note")
        return self

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True, exclude_defaults=False).encode()

    @classmethod
    def decode(cls, payload: bytes, *, topic: str = "acks") -> AckMessage:
        """:class:`~stresswatch.errors.WireError` naming the field when malformed or out of range."""
        return decode_json(cls, payload, source=topic, max_bytes=MAX_ACK_BYTES)


__all__ = ["AckAction", "AckMessage", "Outcome", "check_alert_id"]
