"""stresswatch: consent-gated "reach out" alerts from heart rate and HRV.

Public API::

    import stresswatch
    result = stresswatch.replay(["samples.parquet"])     # polars frames: result.windows, result.alerts
    detector = stresswatch.Detector()                      # batch in, windows and alert decisions out
    pipeline = stresswatch.Pipeline(detector, dispatcher)  # detector -> outbox, consent gate -> transport
    stresswatch.Engine(settings, url="mqtt://...").run()   # the long-running service (docs/ALERTS.md)
"""

from importlib.metadata import PackageNotFoundError, version

from .config import Settings, load_settings
from .detect import Detector, DetectorOutput
from .engine import Engine
from .errors import ConfigError, ConsentError, ParseError, StorageError, StresswatchError, TransportError
from .pipeline import Pipeline, PipelineReport
from .model import SAMPLES_SCHEMA, WINDOW_SCHEMA, Alert, AlertDecision, AlertLevel, Metric, Reason, WindowState
from .replay import ReplayResult, replay

try:
    __version__ = version("stresswatch")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "SAMPLES_SCHEMA",
    "WINDOW_SCHEMA",
    "Alert",
    "AlertDecision",
    "AlertLevel",
    "ConfigError",
    "ConsentError",
    "Detector",
    "DetectorOutput",
    "Engine",
    "Metric",
    "ParseError",
    "Pipeline",
    "PipelineReport",
    "Reason",
    "ReplayResult",
    "Settings",
    "StorageError",
    "StresswatchError",
    "TransportError",
    "WindowState",
    "load_settings",
    "replay",
]
