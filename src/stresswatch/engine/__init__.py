"""The long-running service, in rooms of one job each (docs/ARCHITECTURE.md):

* :mod:`.service`: :class:`Engine`, its work queue, loop, lifecycle and message routing;
* :mod:`.ingest_buffer`: consented batches waiting for the detector, and the frame they become;
* :mod:`.consent_cache`: per-user consent state for the hot path;
* :mod:`.status`: per-user status topics and the sweep that finds expiry;
* :mod:`.persist`: detector state and samples saved (writer thread);
* :mod:`.erasure`: erasure from every store the engine keeps;
* :mod:`.metrics`: operator metrics and health (``/metrics``, ``/healthz``).
"""

from .service import ENGINE_OFFLINE, ENGINE_ONLINE, Engine, EngineStats, Handler

__all__ = ["ENGINE_OFFLINE", "ENGINE_ONLINE", "Engine", "EngineStats", "Handler"]
