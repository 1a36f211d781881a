"""The one clock type: a callable returning an aware UTC datetime (inject it; never read the wall clock in logic);
and the one test of a time zone name."""
from __future__ import annotations
from collections.abc import Callable
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
Clock = Callable[[], datetime]
def utc_now() -> datetime:
    return datetime.now(timezone.utc)
def is_zone(tz: str) -> bool:
    """Whether ``tz`` names an IANA time zone (``Asia/Tokyo``). ``ZoneInfo`` raises ``OSError``
    too for some names (a folder of the zone database such as ``America``; over-long names)."""
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


__all__ = ["Clock", "is_zone", "utc_now"]
