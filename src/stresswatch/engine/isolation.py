"""The detector and dispatcher steps of a flush, with a fault kept to the user who caused it.

The whole frame goes through in one call (the detector's cost is mostly per call); only if
that call fails is it retried user by user, so one user's bad data costs everyone else
nothing but the retry. A detector call that failed may have advanced that call's users'
watermarks, never their windows: a fault comes from reading the frame, before state changes.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from ..detect import DetectorOutput
from ..errors import TransportError
from ..pipeline import Pipeline

OnFault = Callable[[str, str, BaseException], None]  # (user, step, fault)


def detect_isolated(pipeline: Pipeline, frame: pl.DataFrame, on_fault: OnFault) -> list[tuple[pl.DataFrame, DetectorOutput]]:
    """(samples, detector output) pairs: one for the frame, or one per user that went through."""
    try:
        return [(frame, pipeline.detect(frame))]
    except Exception:  # noqa: BLE001 - retry user by user
        pass
    outputs = []
    for key, part in frame.partition_by("user", as_dict=True).items():
        try:
            outputs.append((part, pipeline.detect(part)))
        except Exception as exc:  # noqa: BLE001
            on_fault(str(key[0]), "the detector", exc)
    return outputs


def dispatch_isolated(pipeline: Pipeline, out: DetectorOutput, on_fault: OnFault) -> None:
    """Alerts to the dispatcher; if that fails, alert by alert (one user's alert must not stop
    another's). A broker fault is not a user's: it propagates (deliveries stay pending)."""
    try:
        pipeline.dispatch(out)
        return
    except TransportError:
        raise
    except Exception:  # noqa: BLE001
        pass
    for alert in out.alerts:
        try:
            pipeline.dispatch(DetectorOutput(out.windows.clear(), [alert]))
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001
            on_fault(alert.user, "raising an alert", exc)


__all__ = ["dispatch_isolated", "detect_isolated"]
