"""Ingest payloads, JSON vs binary: bytes per sample, encode and decode throughput.

    python benchmarks/load/bench_wire.py [--batches 2000]

Batches as the load harness sends them (cohort simulator beats, 10/30/60-s batches of one
user), and as a BLE strap sends them (RR in 1/1024 s units, which float32 holds exactly).
Decode is measured to the object the engine uses (``IngestBatch.decode``), and for the binary
format also to numpy arrays only (``wire.decode``). One core, best of 3, same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from users import NS, load_templates  # noqa: E402

from stresswatch.wire import binary as wire  # noqa: E402
from stresswatch.ingest import IngestBatch  # noqa: E402
from stresswatch.model import Metric  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def batches(kind: str, batch_s: int, count: int) -> list[IngestBatch]:
    tp, _ = load_templates()
    rng = np.random.default_rng(1)
    out = []
    for k in range(count):
        j = k % tp.count
        t = tp.t[tp.off[j] : tp.off[j + 1]]
        start = int(rng.integers(0, len(t) - 4 * batch_s))
        sel = slice(start, start + int(np.searchsorted(t[start:], t[start] + batch_s * NS)))
        times, codes, values = t[sel], tp.code[tp.off[j] :][sel.start : sel.stop], tp.value[tp.off[j] :][sel.start : sel.stop]
        if kind == "ble":  # what a strap reports: RR in 1/1024 s
            values = np.where(codes == 0, np.round(values * 1.024) / 1.024, values)
        out.append(
            IngestBatch(
                user=f"u{k % 100000:07d}",
                stream_id=f"3f1c9a2e-load-{k % 1000}",
                seq=k,
                source="ble_hrs/strap" if kind == "ble" else "sim/steps",
                time_ns=times.tolist(),
                metric=[Metric(wire.METRICS[c]) for c in codes.tolist()],
                value=values.tolist(),
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2000)
    a = ap.parse_args()
    print("| data | batch | samples/batch | format | bytes/batch | bytes/sample | encode batches/s | decode batches/s (IngestBatch) | decode batches/s (arrays) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in ("cohort", "ble"):
        for batch_s in (10, 30, 60):
            bs = batches(kind, batch_s, a.batches)
            n_samples = sum(len(b.time_ns) for b in bs)
            js = [b.encode() for b in bs]
            bi = [b.encode_binary() for b in bs]
            assert all(IngestBatch.decode(x) == b for x, b in zip(bi, bs))  # lossless
            assert all(IngestBatch.decode(x) == b for x, b in zip(js, bs))
            n = len(bs)
            rows = [
                ("JSON", js, best(lambda: [b.encode() for b in bs]), best(lambda: [IngestBatch.decode(x) for x in js]), None),
                (
                    "binary",
                    bi,
                    best(lambda: [b.encode_binary() for b in bs]),
                    best(lambda: [IngestBatch.decode(x) for x in bi]),
                    best(lambda: [wire.decode(x) for x in bi]),
                ),
            ]
            for name, payloads, enc, dec, dec_arr in rows:
                size = sum(len(x) for x in payloads)
                print(
                    f"| {kind} | {batch_s} s | {n_samples / n:.1f} | {name} | {size / n:.0f} | {size / n_samples:.1f} | {n / enc:,.0f} |"
                    f" {n / dec:,.0f} | {f'{n / dec_arr:,.0f}' if dec_arr else '-'} |"
                )


if __name__ == "__main__":
    main()
