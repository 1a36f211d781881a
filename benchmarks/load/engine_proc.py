"""The engine under load: the real :class:`stresswatch.engine.Engine` in its own process.

``python benchmarks/load/engine_proc.py SETTINGS_JSON STATE_DIR URL STATS_JSONL [PROFILE_JSON]``

Same as ``stresswatch engine`` (same class, same ``start``/``run``), plus a thread that every
0.5 s appends one JSON line of counters to STATS_JSONL: batches and samples processed by the
engine thread, the receiver's counts, the engine's work-queue length, and whether startup
(restore, subscribe, announce) is done. The harness reads CPU and memory from /proc itself.
With PROFILE_JSON, yappi profiles every thread (CPU time) from SIGUSR1 to SIGUSR2 (py-spy
cannot read this sandbox's process memory).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
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
    settings_path, state_dir, url, stats_path = sys.argv[1:5]
    settings = Settings.model_validate(json.loads(Path(settings_path).read_text()))
    flush_s = float(os.environ.get("SWLOAD_FLUSH_S", "0.5"))  # experiments only; 0.5 s is the engine's default
    eng = Engine(settings, url=url, state_dir=Path(state_dir), flush_s=flush_s)
    t_start = time.time()
    eng.start()
    started = time.time() - t_start
    announced = threading.Event()
    eng.call_soon(announced.set)  # runs after the announce/pump jobs that start() queued
    signal.signal(signal.SIGTERM, lambda *_: eng.request_stop())
    signal.signal(signal.SIGINT, lambda *_: eng.request_stop())
    if len(sys.argv) > 5:  # profile between SIGUSR1 and SIGUSR2 (all threads, CPU time)
        profile_path = sys.argv[5]
        import yappi

        yappi.set_clock_type("cpu")
        signal.signal(signal.SIGUSR1, lambda *_: yappi.start(builtins=False, profile_threads=True))
        signal.signal(signal.SIGUSR2, lambda *_: _write_profile(profile_path))

    def report() -> None:
        with open(stats_path, "a", buffering=1) as f:
            while not eng.stopping:
                st = eng.stats()
                f.write(
                    json.dumps(
                        {
                            "wall": time.time(),
                            "start_s": started,
                            "ready": announced.is_set(),
                            "batches": st.batches_processed,
                            "samples": st.samples_processed,
                            "accepted": st.accepted,
                            "duplicates": st.duplicates,
                            "rejected": st.rejected,
                            "queue": st.queue,
                            "dropped": st.dropped_batches,
                            "users": st.users,
                        }
                    )
                    + "\n"
                )
                time.sleep(0.5)

    threading.Thread(target=report, daemon=True).start()
    eng.run()


if __name__ == "__main__":
    main()
