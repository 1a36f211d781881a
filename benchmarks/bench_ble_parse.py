"""BLE Heart Rate Measurement parsing throughput: vectorised batch parser vs the scalar parser.

    python benchmarks/bench_ble_parse.py [--n 1000000] [--repeat 3]

Builds ``--n`` notifications by cycling the committed fixtures' notifications (every flag
combination plus the real-RR sessions, so the mix of 0-4 RR per notification is realistic),
then times, best of ``--repeat``, one core (numpy is single-threaded here):

* ``parse_batch`` on the packed buffer + offsets (what the recording reader / a stream
  buffer hands over);
* ``parse_many`` on a ``list[bytes]`` (packing included);
* the reference in the same run: the scalar ``parse_heart_rate_measurement`` in a loop
  over a 100,000-notification slice (the per-notification cost of the naive approach).

The batch result is checked equal to the scalar result on the slice before timing.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from stresswatch_adapters.ble_hrs.batch import pack, parse_batch, parse_many  # noqa: E402
from stresswatch_adapters.ble_hrs.parser import parse_heart_rate_measurement  # noqa: E402
from stresswatch_adapters.ble_hrs.recording import read_recording  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ble"


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scalar-n", type=int, default=100_000)
    args = ap.parse_args()

    pool = [
        e.data
        for name in ("flag_matrix", "session_1h", "contact_loss", "disconnect")
        for e in read_recording(FIXTURES / f"{name}.ble.jsonl").notifications
    ]
    notes = list(itertools.islice(itertools.cycle(pool), args.n))
    buf, offsets = pack(notes)
    sl = notes[: args.scalar_n]

    batch = parse_many(sl)
    assert [batch.row(i) for i in range(0, len(sl), 997)] == [parse_heart_rate_measurement(sl[i]) for i in range(0, len(sl), 997)]

    t_batch = best(lambda: parse_batch(buf, offsets), args.repeat)
    t_many = best(lambda: parse_many(notes), args.repeat)
    t_scalar = best(lambda: [parse_heart_rate_measurement(d) for d in sl], args.repeat)
    n_rr = int(parse_batch(buf, offsets).rr_counts.sum())

    print(f"date {date.today()}  python {platform.python_version()}  numpy {np.__version__}  {platform.machine()}")
    print(f"{args.n:,} notifications ({n_rr:,} RR intervals, {buf.nbytes:,} bytes)")
    print(f"{'what':48} {'notifications/s':>16} {'time':>10}")
    print(f"{'parse_batch (packed buffer + offsets)':48} {args.n / t_batch:16,.0f} {t_batch * 1e3:8.0f} ms")
    print(f"{'parse_many (list[bytes], packing included)':48} {args.n / t_many:16,.0f} {t_many * 1e3:8.0f} ms")
    print(f"{'reference: scalar parser loop':48} {len(sl) / t_scalar:16,.0f} {t_scalar * 1e3:8.0f} ms  (on {len(sl):,})")
    print(f"speed-up of parse_batch over the scalar loop: {len(sl) / t_scalar and (args.n / t_batch) / (len(sl) / t_scalar):.0f}x")


if __name__ == "__main__":
    main()
