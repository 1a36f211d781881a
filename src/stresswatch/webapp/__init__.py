"""The support workers' web app (``stresswatch worker-app``; docs/WORKER-APP.md).

Needs the ``[web]`` extra (starlette, uvicorn): :func:`require_web` names it when missing.
"""

from __future__ import annotations

from ..errors import ConfigError


def require_web() -> None:
    """ConfigError naming the extra if the web dependencies are not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the worker app needs the [web] extra ({exc.name} is not installed): pip install 'stresswatch[web]'"
        ) from None
