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


class CountingEngine(Engine):
    batches = 0
    samples = 0
    FLUSH_S = float(os.environ.get("SWLOAD_FLUSH_S", Engine.FLUSH_S))  # experiments only

    def _flush_pending(self) -> None:
        """Counts a batch as processed once the detector has had it (not when queued)."""
        pending = self._pending
        super()._flush_pending()
        self.batches += len(pending) + self._dropped_seen()
        self.samples += sum(len(b.time_ns) for b in pending)

    def _dropped_seen(self) -> int:
        new = self.dropped_batches - getattr(self, "_dropped_counted", 0)
        self._dropped_counted = self.dropped_batches
        return new


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
    eng = CountingEngine(settings, url=url, state_dir=Path(state_dir))
    t_start = time.time()
    eng.start()
    started = time.time() - t_start
    announced = threading.Event()
    eng._queue.put(announced.set)  # runs after the announce/pump jobs that start() queued
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
            while not eng._stopping.is_set():
                rx = eng.receiver
                f.write(
                    json.dumps(
                        {
                            "wall": time.time(),
                            "start_s": started,
                            "ready": announced.is_set(),
                            "batches": eng.batches,
                            "samples": eng.samples,
                            "accepted": rx.accepted if rx else None,
                            "duplicates": rx.duplicates if rx else None,
                            "rejected": len(rx.rejected) if rx else None,
                            "queue": eng._queue.qsize(),
                            "dropped": eng.dropped_batches,
                            "users": len(eng.pipeline.detector.users),
                        }
                    )
                    + "\n"
                )
                time.sleep(0.5)

    threading.Thread(target=report, daemon=True).start()
    eng.run()


if __name__ == "__main__":
    main()
