"""Optional dependencies: features that only some commands use live behind pip extras, so the
core install stays what ``pip install stresswatch && stresswatch demo`` needs.

==========  ===================================  ===================================
extra       brings                               for
==========  ===================================  ===================================
``plot``    matplotlib                           ``replay --plot``, :mod:`stresswatch.plot`
``ble``     bleak                                ``pair``, ``stream``, ``record`` with a real device
``sim``     scipy                                the labelled cohort simulator (``stresswatch_fixtures.cohort``)
``web``     starlette, uvicorn                   ``worker-app``, the support workers' web app
``cluster`` nats-py                              ``engine --cluster``, ``cluster ...`` (NATS JetStream)
``bench``   neurokit2, pandas, psutil, yappi     ``benchmarks/``
==========  ===================================  ===================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


class MissingExtra(ConfigError):
    """A feature was asked for whose optional dependency is not installed."""

    def __init__(self, feature: str, extra: str) -> None:
        self.extra = extra
        super().__init__(f"{feature} needs the {extra} extra: pip install 'stresswatch[{extra}]'")


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``extra`` (one line, no traceback)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(feature, extra) from None


__all__ = ["MissingExtra", "require"]
