"""JSON wire messages through pydantic: one conversion of a failed validation into :class:`WireError`."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import WireError
from .limits import MAX_PAYLOAD_BYTES
from .ids import ID_RULE, is_valid_id

M = TypeVar("M", bound=BaseModel)

# pydantic error types -> our reason codes; anything else is "malformed"
_REASONS = {
    "finite_number": "value_range",
    "too_long": "too_large",
    "string_too_long": "too_large",
    "datetime_from_date_parsing": "time_range",
    "datetime_parsing": "malformed",
}
REASONS = ("malformed", "too_large", "time_range", "value_range", "bad_id", "wrong_user")


def refuse(reason: str, message: str) -> PydanticCustomError:
    """Raise this inside a pydantic validator to refuse with one of :data:`REASONS`."""
    assert reason in REASONS
    return PydanticCustomError(reason, message)


def checked_id(kind: str, v: str) -> str:
    """``v`` if it is a valid id by the one grammar (:mod:`.ids`), else a ``bad_id`` refusal."""
    if not is_valid_id(v):
        raise refuse("bad_id", f"{kind} id must be {ID_RULE}")
    return v


def decode_json(model: type[M], payload: bytes, *, source: str, max_bytes: int = MAX_PAYLOAD_BYTES, context: dict | None = None) -> M:
    """A wire message (JSON) as ``model``; anything malformed or out of range is one
    :class:`WireError` naming the first offending field. Never a value from the payload in the
    message: pydantic's messages describe the expectation, not the input."""
    if len(payload) > max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}", reason="too_large", source=source)
    try:
        return model.model_validate_json(payload, context=context)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        kind = err["type"]
        reason = kind if kind in REASONS else _REASONS.get(kind, "malformed")
        field = ".".join(str(p) for p in err["loc"]) or None
        raise WireError(err["msg"], reason=reason, source=source, field=field) from None


__all__ = ["REASONS", "decode_json", "refuse"]
