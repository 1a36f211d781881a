"""The support workers' web app (``stresswatch worker-app``; docs/WORKER-APP.md).

Needs the ``[web]`` extra (starlette, uvicorn): :func:`require_web` names it when missing.
"""

from __future__ import annotations

from ..extras import require


def require_web() -> None:
    """:class:`~stresswatch.extras.MissingExtra` naming the extra if the web dependencies are not installed."""
    for module in ("starlette", "uvicorn"):
        require(module, extra="web", feature="the worker app")
