"""What the engine can represent, as limits every wire message is checked against.

Two kinds of limit:

* **absolute** (always applied, also where no clock is at hand): every time lies in
  [2000-01-01, 2200-01-01) UTC, well inside both ``datetime`` and int64 nanoseconds (which end
  in 1677 and 2262), so no later conversion can overflow; values are finite and within
  per-metric bounds no sensor encoding exceeds; every list and string has a length cap;
* **relative to now** (:class:`TimeWindow`, applied when the decoder is given ``now`` from the
  engine's injected clock): ingest samples no older than ``max_age_s`` and no further in the
  future than ``max_future_s``; consent events not dated after ``now + consent_future_s``.

Defaults are documented in docs/INGEST.md and configurable under ``[engine]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

TIME_MIN = datetime(2000, 1, 1, tzinfo=timezone.utc)
TIME_MAX = datetime(2200, 1, 1, tzinfo=timezone.utc)
TIME_MIN_NS = int(TIME_MIN.timestamp()) * 1_000_000_000
TIME_MAX_NS = int(TIME_MAX.timestamp()) * 1_000_000_000

# Per metric: (lowest, highest) value accepted. Wider than physiology (the detector cleans
# artefacts itself) but no wider than a device can encode: BLE Heart Rate Service RR is a
# uint16 in 1/1024 s (< 64 s), HR a byte or uint16 (a broken strap's 0xFFFF is refused
# rather than averaged into a window).
VALUE_BOUNDS: dict[str, tuple[float, float]] = {
    "rr_ms": (0.0, 65_536.0),
    "hr_bpm": (0.0, 1_000.0),
    "steps": (0.0, 100_000.0),
    "motion": (-1_000_000.0, 1_000_000.0),
}

MAX_BATCH_SAMPLES = 100_000
MAX_STREAM_ID_CHARS = 64
MAX_SOURCE_CHARS = 256
MAX_CONSENT_EVENTS = 500
MAX_RECIPIENTS = 64
MAX_NOTE_CHARS = 500
MAX_SHORT_TEXT_CHARS = 64  # display name, consent text version, "via", quiet hours
MAX_SEQ = 2**64 - 1  # the binary format's uint64

# Longest JSON a legitimate sample can take in a batch our encoder writes: a 19-digit time
# and comma, the longest quoted metric name and comma, the longest float repr within
# VALUE_BOUNDS (e.g. "-123456.78901234567" or "1.2345678901234567e-05") and comma.
_MAX_JSON_SAMPLE_BYTES = 20 + len('"hr_bpm",') + 23
# Fixed part: field names, schema_version, seq (20 digits), user and stream id (64 each), source
# (256 characters, up to 4 bytes each, escapes included at 6 bytes: bounded by 6 x 256).
_MAX_JSON_HEADER_BYTES = 1_024 + 64 + 64 + 6 * MAX_SOURCE_CHARS
MAX_INGEST_BYTES = _MAX_JSON_HEADER_BYTES + MAX_BATCH_SAMPLES * _MAX_JSON_SAMPLE_BYTES  # 5.2 MB
# A consent event at its caps: ids and short texts of 64 characters (6 bytes per character
# escaped), 64 recipients of 64 characters, two timestamps; field names included.
_MAX_CONSENT_EVENT_BYTES = 512 + 6 * 4 * MAX_SHORT_TEXT_CHARS + MAX_RECIPIENTS * (MAX_SHORT_TEXT_CHARS + 3) + 2 * 40
MAX_CONSENT_BYTES = 256 + MAX_CONSENT_EVENTS * _MAX_CONSENT_EVENT_BYTES  # 6.3 MB
MAX_ACK_BYTES = 4_096 + 6 * MAX_NOTE_CHARS
# The largest payload any legitimate message can have: the broker's message_size_limit.
MAX_PAYLOAD_BYTES = max(MAX_INGEST_BYTES, MAX_CONSENT_BYTES, MAX_ACK_BYTES)


@dataclass(frozen=True)
class TimeWindow:
    """Times accepted relative to ``now`` (seconds). See the module docstring."""

    max_age_s: float = 400 * 86_400.0  # a year of vendor export history sent with `import --publish`
    max_future_s: float = 600.0  # clock skew of a phone or laptop
    consent_future_s: float = 86_400.0

    def ingest_ns(self, now: datetime) -> tuple[int, int]:
        """[lowest, highest] sample time in ns accepted at ``now`` (clipped to the absolute range)."""
        now_ns = int(now.timestamp() * 1e9)
        return max(TIME_MIN_NS, now_ns - int(self.max_age_s * 1e9)), min(TIME_MAX_NS - 1, now_ns + int(self.max_future_s * 1e9))


__all__ = [
    "MAX_ACK_BYTES",
    "MAX_BATCH_SAMPLES",
    "MAX_CONSENT_BYTES",
    "MAX_CONSENT_EVENTS",
    "MAX_INGEST_BYTES",
    "MAX_PAYLOAD_BYTES",
    "TIME_MAX",
    "TIME_MIN",
    "TimeWindow",
    "VALUE_BOUNDS",
]
