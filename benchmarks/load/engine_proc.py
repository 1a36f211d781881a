"""The engine under load: the real :class:`stresswatch.engine.Engine` in its own process.

``python benchmarks/load/engine_proc.py SETTINGS_JSON [PROFILE_JSON]``

Same as ``stresswatch engine`` (same class, same ``start``/``run``, same settings). The
harness reads its counters where an operator does, from the engine's ``/metrics`` and
``/healthz`` (``settings.metrics``), and CPU and memory from /proc. With PROFILE_JSON, yappi
profiles every thread (CPU time) from SIGUSR1 to SIGUSR2 (py-spy cannot read this sandbox's
process memory). ``SWLOAD_FLUSH_S`` changes the engine's flush interval (an experiment: the
harness prints it as a deviation).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from stresswatch.config import Settings
from stresswatch.engine import Engine


def _write_profile(path: str) -> None:
    import yappi

    yappi.stop()
    stats = yappi.get_func_stats()
    total = sum(t.ttot for t in yappi.get_thread_stats()) or 1.0
    rows = [
        {"function": f"{f.name} ({Path(f.module).name}:{f.lineno})", "calls": f.ncall, "inclusive": f.ttot / total, "self": f.tsub / total}
        for f in stats
    ]
    threads = [{"thread": t.name, "cpu_s": t.ttot} for t in yappi.get_thread_stats()]
    Path(path).write_text(json.dumps({"total_cpu_s": total, "threads": threads, "functions": rows}))


def main() -> None:
    settings = Settings.model_validate(json.loads(Path(sys.argv[1]).read_text()))
    kwargs = {"flush_s": float(os.environ["SWLOAD_FLUSH_S"])} if "SWLOAD_FLUSH_S" in os.environ else {}
    eng = Engine(settings, url=settings.mqtt.url or "", **kwargs)
    signal.signal(signal.SIGTERM, lambda *_: eng.request_stop())
    signal.signal(signal.SIGINT, lambda *_: eng.request_stop())
    if len(sys.argv) > 2:  # profile between SIGUSR1 and SIGUSR2 (all threads, CPU time)
        profile_path = sys.argv[2]
        import yappi

        yappi.set_clock_type("cpu")
        signal.signal(signal.SIGUSR1, lambda *_: yappi.start(builtins=False, profile_threads=True))
        signal.signal(signal.SIGUSR2, lambda *_: _write_profile(profile_path))
    eng.run()


if __name__ == "__main__":
    main()
