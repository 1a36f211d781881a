"""The one clock type: a callable returning an aware UTC datetime (inject it; never read the wall clock in logic)."""
from __future__ import annotations
from collections.abc import Callable
from datetime import datetime, timezone
Clock = Callable[[], datetime]
def utc_now() -> datetime:
    return datetime.now(timezone.utc)
__all__ = ["Clock", "utc_now"]
