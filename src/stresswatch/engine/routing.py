"""Messages on ``{prefix}/{kind}/{id}`` to one handler per kind, each fault kept to its id."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import StresswatchError
from ..wire.ids import is_valid_id

log = logging.getLogger("stresswatch.engine")

# called on the engine thread with (id, payload, topic)
Handler = Callable[[str, bytes, str], None]


class FaultLog:
    """One log line per (step, fault) per ``every_s``: a fault repeating every tick, or a
    flood of bad messages, must not flood the log. Names the fault's type, never a value."""

    def __init__(self, every_s: float = 60.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._mono = monotonic
        self._last: dict[tuple[str, str], float] = {}
        self.count = 0

    def fault(self, what: str, exc: BaseException) -> None:
        self.count += 1
        key = (what, type(exc).__name__)
        now = self._mono()
        if now - self._last.get(key, -self.every_s) >= self.every_s:
            self._last[key] = now
            log.error("%s failed (%s); the engine goes on", what, type(exc).__name__)


class Router:
    """``route(topic, payload)`` (paho's thread) returns the job to queue, or None."""

    def __init__(
        self, prefix: str, on_fault: Callable[[str, str, BaseException], None], *, on_bad_id: Callable[[str], None] = lambda kind: None
    ) -> None:
        """``on_fault(kind, id, exc)``: a handler raised something other than a StresswatchError.
        ``on_bad_id(kind)``: the topic's last level is not a valid id (the broker's ACL should
        already refuse it): counted, not handled."""
        self.prefix = prefix
        self.handlers: dict[str, Handler] = {}
        self._on_fault = on_fault
        self._on_bad_id = on_bad_id

    def subscriptions(self) -> list[str]:
        return [f"{self.prefix}/{kind}/+" for kind in self.handlers]

    def route(self, topic: str, payload: bytes) -> Callable[[], None] | None:
        head, _, who = topic.rpartition("/")
        prefix, _, kind = head.rpartition("/")
        handler = self.handlers.get(kind) if prefix == self.prefix else None
        if handler is None:
            return None
        if not is_valid_id(who):
            self._on_bad_id(kind)
            return None
        return lambda: self._call(kind, handler, who, payload, topic)

    def _call(self, kind: str, handler: Handler, who: str, payload: bytes, topic: str) -> None:
        try:
            handler(who, payload, topic)
        except StresswatchError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept to the id the message came from
            self._on_fault(kind, who, exc)


__all__ = ["FaultLog", "Handler", "Router"]
