"""Detection: clean -> window features -> personal baseline -> score -> episodes."""

from .detector import Detector, DetectorOutput
from .features import window_features

__all__ = ["Detector", "DetectorOutput", "window_features"]
