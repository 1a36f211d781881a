"""Consent on the wire: the companion publishes the user's whole consent history, retained, on
``{prefix}/consent/{user}``; the engine appends what it has not stored yet (idempotent on
``event_id``). A retained message means an engine that starts later still learns it.

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "user": "alice", "events": [{"event_id": "…", "action": "grant",
     "at": "2026-11-25T10:00:00+00:00", "via": "cli", "text_version": "2026-11-2",
     "recipients": ["sam", "team-north"], "visibility": "reach_out", "display_name": "peer-3fa1c2",
     "quiet_hours": "22:00-07:00@Europe/London", "expires_at": null}, ...]}

An empty retained payload clears the topic (erasure).
"""

from __future__ import annotations


from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ..errors import ConsentError, ParseError
from ..model import decode_json
from .state import Action, ConsentEvent, QuietHours, Visibility


class _WireEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=1, max_length=64)
    action: Action
    at: AwareDatetime
    via: str = Field(max_length=32)
    text_version: str = Field(max_length=32)
    recipients: list[str] = Field(default_factory=list, max_length=64)
    visibility: Visibility = Visibility.REACH_OUT
    display_name: str | None = Field(default=None, max_length=64)
    quiet_hours: str | None = None
    expires_at: AwareDatetime | None = None


class ConsentMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    user: str = Field(min_length=1)
    events: list[_WireEvent] = Field(max_length=10_000)


def encode_consent(user: str, events: list[ConsentEvent]) -> bytes:
    return ConsentMessage(
        user=user,
        events=[
            _WireEvent(
                event_id=e.event_id,
                action=e.action,
                at=e.at,
                via=e.via,
                text_version=e.text_version,
                recipients=list(e.recipients),
                visibility=e.visibility,
                display_name=e.display_name,
                quiet_hours=e.quiet_hours.encode() if e.quiet_hours else None,
                expires_at=e.expires_at,
            )
            for e in events
        ],
    ).model_dump_json().encode()


def decode_consent(payload: bytes, *, topic_user: str, topic: str = "consent") -> list[ConsentEvent]:
    """Events of a consent message; :class:`ParseError` naming the field when malformed.

    The user in the payload must be the user of the topic: the broker's ACL lets a user write
    only their own consent topic, and the engine does not take a payload's word over it.
    """
    msg = decode_json(ConsentMessage, payload, source=topic)
    if msg.user != topic_user:
        raise ParseError(f"payload user does not match the topic's user", source=topic, field="user")
    out = []
    for i, e in enumerate(msg.events):
        try:
            quiet = QuietHours.decode(e.quiet_hours)
        except ConsentError as exc:
            raise ParseError(str(exc), source=topic, field=f"events.{i}.quiet_hours") from None
        out.append(
            ConsentEvent(
                user=msg.user,
                action=e.action,
                at=e.at,
                via=e.via,
                text_version=e.text_version,
                recipients=tuple(e.recipients),
                visibility=e.visibility,
                display_name=e.display_name,
                quiet_hours=quiet,
                expires_at=e.expires_at,
                event_id=e.event_id,
            )
        )
    return out


__all__ = ["ConsentMessage", "decode_consent", "encode_consent"]
