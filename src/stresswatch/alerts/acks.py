"""What a support worker sends back on ``{prefix}/acks/{worker}`` (QoS 1).

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "alert_id": "…", "action": "ack"}
    {"schema_version": 1, "alert_id": "…", "action": "resolve", "outcome": "reached_out", "note": "called, OK"}

The worker is the topic's last level (the broker's ACL lets a worker write only its own).
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..model import decode_json
from .lifecycle import Outcome


class AckAction(str, enum.Enum):
    ACK = "ack"
    RESOLVE = "resolve"


class AckMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    alert_id: str = Field(min_length=1, max_length=64)
    action: AckAction
    outcome: Outcome | None = None
    note: str | None = Field(default=None, max_length=500)

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
        return decode_json(cls, payload, source=topic)
