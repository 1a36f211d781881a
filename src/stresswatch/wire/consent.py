"""The consent message on ``{prefix}/consent/{user}``: the companion publishes the user's whole
consent history, retained; the engine appends what it has not stored yet (idempotent on
``event_id``). A retained message means an engine that starts later still learns it.

Payload (``schema_version`` 1, JSON)::

    {"schema_version": 1, "user": "alice", "events": [{"event_id": "…", "action": "grant",
     "at": "2026-11-25T10:00:00+00:00", "via": "cli", "text_version": "2026-11-2",
     "recipients": ["sam", "team-north"], "visibility": "reach_out", "display_name": "peer-3fa1c2",
     "quiet_hours": "22:00-07:00@Europe/London", "expires_at": null, "timezone": "Europe/London"}, ...]}

An empty retained payload clears the topic (erasure).

Checked at this boundary (:mod:`stresswatch.wire.limits`): the user, every event id and every
recipient by the id grammar; ``at`` and ``expires_at`` in [2000, 2200) UTC (so no later
conversion to UTC can overflow) and, given ``now``, ``at`` not after ``now`` plus a day; at most
500 events, 64 recipients an event, short texts of 64 printable characters; ``timezone``
(optional: the person's own zone, for the detector's time-of-day baselines) an IANA name.
"""

from __future__ import annotations


from datetime import datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..consent.state import Action, ConsentEvent, QuietHours, Visibility, check_zone
from ..errors import ConsentError, WireError
from .json import checked_id, decode_json, refuse
from .limits import MAX_CONSENT_BYTES, MAX_CONSENT_EVENTS, MAX_RECIPIENTS, MAX_SHORT_TEXT_CHARS, TIME_MAX, TIME_MIN, TimeWindow


def _time(v: datetime | None, info: ValidationInfo) -> datetime | None:
    if v is None:
        return v
    try:
        ok = TIME_MIN <= v < TIME_MAX  # an aware comparison: no conversion that could overflow
    except OverflowError:
        ok = False
    if not ok:
        raise refuse("time_range", "must lie in 2000-01-01..2200-01-01 UTC")
    latest = (info.context or {}).get("latest_at")
    if info.field_name == "at" and latest is not None and v > latest:
        raise refuse("time_range", "is later than now (plus a day of clock skew)")
    return v


class _WireEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str
    action: Action
    at: AwareDatetime
    via: str = Field(max_length=32)
    text_version: str = Field(max_length=32)
    recipients: list[str] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    visibility: Visibility = Visibility.REACH_OUT
    display_name: str | None = Field(default=None, max_length=MAX_SHORT_TEXT_CHARS)
    quiet_hours: str | None = Field(default=None, max_length=MAX_SHORT_TEXT_CHARS)
    expires_at: AwareDatetime | None = None
    timezone: str | None = Field(default=None, max_length=MAX_SHORT_TEXT_CHARS)

    @field_validator("event_id")
    @classmethod
    def _event_id(cls, v: str) -> str:
        return checked_id("event", v)

    @field_validator("at", "expires_at")
    @classmethod
    def _times(cls, v: datetime | None, info: ValidationInfo) -> datetime | None:
        return _time(v, info)

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, v: list[str]) -> list[str]:
        for r in v:
            checked_id("recipient", r)
        return v

    @field_validator("via", "text_version", "display_name", "quiet_hours")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise refuse("malformed", "must not contain control characters")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return check_zone(v)
        except ConsentError:  # its message repeats the text: say what is expected instead
            raise refuse("malformed", "expected an IANA time zone name such as Asia/Tokyo") from None


class ConsentMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=1, ge=1, le=1)
    user: str
    events: list[_WireEvent] = Field(max_length=MAX_CONSENT_EVENTS)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        return checked_id("user", v)


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
                timezone=e.timezone,
            )
            for e in events
        ],
    ).model_dump_json().encode()


def decode_consent(
    payload: bytes, *, topic_user: str, topic: str = "consent", now: datetime | None = None, window: TimeWindow = TimeWindow()
) -> list[ConsentEvent]:
    """Events of a consent message; :class:`WireError` naming the field when malformed or out
    of range (``now``: also refuse events dated after now plus ``window.consent_future_s``).

    The user in the payload must be the user of the topic: the broker's ACL lets a user write
    only their own consent topic, and the engine does not take a payload's word over it.
    """
    latest = now + timedelta(seconds=window.consent_future_s) if now is not None else None
    msg = decode_json(ConsentMessage, payload, source=topic, max_bytes=MAX_CONSENT_BYTES, context={"latest_at": latest})
    if msg.user != topic_user:
        raise WireError("payload user does not match the topic's user", reason="wrong_user", source=topic, field="user")
    out = []
    for i, e in enumerate(msg.events):
        try:
            quiet = QuietHours.decode(e.quiet_hours)
        except ConsentError:  # its message repeats the text: say what is expected instead
            raise WireError("expected HH:MM-HH:MM@Zone", reason="malformed", source=topic, field=f"events.{i}.quiet_hours") from None
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
                timezone=e.timezone,
            )
        )
    return out


__all__ = ["ConsentMessage", "decode_consent", "encode_consent"]
