"""Import benchmarks: Apple Health export.xml (throughput + peak memory) and FIT.

    python benchmarks/bench_import.py apple [--size-mb 1024] [--dir /tmp/sw-bench]
    python benchmarks/bench_import.py fit [--minutes 600]

apple: generates a seeded ``export.xml`` of about ``--size-mb`` MB into ``--dir`` (never
committed) with a realistic mix (heart rate every 2 min; step, energy and distance records;
an HRV SDNN record with ~60 beats every 2 h), then, each in a fresh subprocess so peak RSS
is its own:

1. reference: ``xml.etree.ElementTree.iterparse`` over the file with the usual
   bounded-memory idiom (clear the root after each record), keeping no values;
2. ``AppleHealthSource`` parse only (all chunks produced and dropped);
3. the whole ``stresswatch import apple_health FILE --user bench --out DIR`` (parse, stage,
   merge into the Parquet store).

Reports MB/s and peak RSS (each child's own ``getrusage(RUSAGE_SELF).ru_maxrss``) for each.

fit: encodes a long activity (1 Hz records + hrv RR arrays) with the fixtures' FIT encoder,
then times ``fitdecode`` iterating every frame (the decoder's own decode time, the
reference) against ``decode_fit`` and the full ``FitSource`` (decode + samples frame).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEVICE = "&lt;&lt;HKDevice: 0x283a1c0a0&gt;, name:Apple Watch, manufacturer:Apple Inc., model:Watch, hardware:Watch6,1, software:9.1&gt;"
HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE HealthData [
<!ELEMENT HealthData (ExportDate,Me,(Record|Correlation|Workout|ActivitySummary|ClinicalRecord)*)>
<!ATTLIST HealthData
  locale CDATA #REQUIRED
>
]>
<HealthData locale="en_US">
 <ExportDate value="2025-01-01 00:00:00 +0100"/>
 <Me HKCharacteristicTypeIdentifierDateOfBirth="" HKCharacteristicTypeIdentifierBiologicalSex="HKBiologicalSexNotSet"/>
"""


def generate_export(path: Path, size_mb: int, seed: int = 1) -> dict[str, int]:
    """Write a synthetic export.xml of about ``size_mb`` MB; return what it holds."""
    rng = random.Random(seed)
    target = size_mb * 1024 * 1024
    t = datetime(2019, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    counts = {"hr": 0, "sdnn": 0, "beats": 0, "other": 0}
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(HEADER)
        written += len(HEADER)
        while written < target:
            block = []
            for _ in range(720):  # one day in 2-minute steps
                ts = t.strftime("%Y-%m-%d %H:%M:%S +0100")
                block.append(
                    f' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Bench Watch" sourceVersion="9.1" device="{DEVICE}" '
                    f'unit="count/min" creationDate="{ts}" startDate="{ts}" endDate="{ts}" value="{rng.randint(52, 110)}">\n'
                    f'  <MetadataEntry key="HKMetadataKeyHeartRateMotionContext" value="0"/>\n </Record>\n'
                )
                counts["hr"] += 1
                for kind, unit, val in (
                    ("HKQuantityTypeIdentifierStepCount", "count", rng.randint(0, 200)),
                    ("HKQuantityTypeIdentifierActiveEnergyBurned", "Cal", round(rng.random() * 5, 3)),
                    ("HKQuantityTypeIdentifierDistanceWalkingRunning", "km", round(rng.random() / 10, 4)),
                ):
                    block.append(
                        f' <Record type="{kind}" sourceName="Bench Phone" sourceVersion="16.1" unit="{unit}" '
                        f'creationDate="{ts}" startDate="{ts}" endDate="{ts}" value="{val}"/>\n'
                    )
                    counts["other"] += 1
                if t.minute == 0 and t.hour % 2 == 0:
                    beats = []
                    bt = t + timedelta(seconds=1)
                    for _ in range(rng.randint(55, 70)):
                        bt += timedelta(milliseconds=rng.randint(750, 1050))
                        hour12 = bt.hour % 12 or 12
                        ampm = "PM" if bt.hour >= 12 else "AM"
                        beats.append(
                            f'   <InstantaneousBeatsPerMinute bpm="{rng.randint(55, 80)}" '
                            f'time="{hour12}:{bt.minute:02d}:{bt.second:02d}.{bt.microsecond // 10000:02d}\u202f{ampm}"/>\n'
                        )
                    counts["sdnn"] += 1
                    counts["beats"] += len(beats)
                    block.append(
                        f' <Record type="HKQuantityTypeIdentifierHeartRateVariabilitySDNN" sourceName="Bench Watch" sourceVersion="9.1" '
                        f'device="{DEVICE}" unit="ms" creationDate="{ts}" startDate="{ts}" endDate="{ts}" value="{rng.uniform(20, 80):.3f}">\n'
                        f"  <HeartRateVariabilityMetadataList>\n{''.join(beats)}  </HeartRateVariabilityMetadataList>\n </Record>\n"
                    )
                t += timedelta(minutes=2)
            text = "".join(block)
            fh.write(text)
            written += len(text.encode("utf-8"))
        fh.write("</HealthData>\n")
    return counts


RSS = "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"

# The usual bounded-memory iterparse idiom: clear each finished element and drop the
# root's references to them (elem.clear() alone leaves an empty element per record).
CHILD_REFERENCE = """
import sys, time, xml.etree.ElementTree as ET
t = time.perf_counter(); n = 0; root = None
for event, elem in ET.iterparse(sys.argv[1], events=("start", "end")):
    if root is None:
        root = elem
    if event == "end":
        n += 1
        if elem.tag == "Record":
            root.clear()
print(time.perf_counter() - t, n)
""" + RSS

CHILD_PARSE = """
import sys, time
from stresswatch.sources import SourceRegistry
t = time.perf_counter()
src = SourceRegistry.discover().open(sys.argv[1], kind="apple_health", user="bench")
n = sum(f.height for f in src.batches())
print(time.perf_counter() - t, n)
""" + RSS

CHILD_IMPORT = """
import sys, time
from stresswatch.cli import main
t = time.perf_counter()
code = main(sys.argv[1:])
assert code == 0, code
print(time.perf_counter() - t)
""" + RSS


def run_child(args: list[str]) -> tuple[float, str, float]:
    """Run a child; return (wall s, its stdout without the last line, its own peak RSS in MB)."""
    env = dict(os.environ, POLARS_MAX_THREADS="1")
    t = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    # RUSAGE_CHILDREN is a maximum over all children so far: each child prints its own peak.
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{args[:3]} failed: {err[-2000:]}")
    lines = out.strip().splitlines()
    rss_mb = float(lines[-1])
    return wall, "\n".join(lines[:-1]), rss_mb


def bench_apple(size_mb: int, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    xml = workdir / "export.xml"
    meta = workdir / "export.json"
    if not xml.exists() or not meta.exists() or json.loads(meta.read_text())["size_mb"] != size_mb:
        t = time.perf_counter()
        counts = generate_export(xml, size_mb)
        meta.write_text(json.dumps({"size_mb": size_mb, **counts}))
        print(f"generated {xml} in {time.perf_counter() - t:.0f} s: {counts}", flush=True)
    counts = json.loads(meta.read_text())
    mb = xml.stat().st_size / 1e6
    py = sys.executable
    rows = []
    # Each measurement in its own child, the smallest first so ru_maxrss (a max over children) stays attributable.
    wall, out, rss = run_child([py, "-c", CHILD_REFERENCE, str(xml)])
    rows.append(("reference: ElementTree.iterparse, root cleared per record (no values kept)", float(out.split()[0]), rss))
    wall, out, rss = run_child([py, "-c", CHILD_PARSE, str(xml)])
    rows.append((f"AppleHealthSource parse only ({int(out.split()[1]):,} samples)", float(out.split()[0]), rss))
    store = workdir / "store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    wall, out, rss = run_child([py, "-c", CHILD_IMPORT, "import", "apple_health", str(xml), "--user", "bench", "--out", str(store), "--no-progress"])
    rows.append(("`stresswatch import apple_health` (parse + stage + Parquet store)", float(out.split()[-1]), rss))
    print(f"\nApple Health export.xml: {mb:,.0f} MB; {counts['hr']:,} heart-rate records, {counts['sdnn']:,} SDNN records "
          f"({counts['beats']:,} beats), {counts['other']:,} other records")
    print(f"date {date.today()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print("| what | time | MB/s | peak RSS |\n|---|---|---|---|")
    for what, secs, rss in rows:
        print(f"| {what} | {secs:.1f} s | {mb / secs:.1f} | {rss:.0f} MB |")
    print(f"\nload average {os.getloadavg()[0]:.1f}")


def bench_fit(minutes: int) -> None:
    import fitdecode
    import numpy as np

    spec = importlib.util.spec_from_file_location("fitenc", ROOT / "fixtures" / "fit" / "fitenc.py")
    assert spec and spec.loader
    fitenc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fitenc)
    from stresswatch_adapters.fit import FitSource, decode_fit

    rng = np.random.default_rng(3)
    w = fitenc.FitWriter()
    w.define(0, 0, [(0, 1, fitenc.ENUM), (1, 1, fitenc.UINT16), (2, 1, fitenc.UINT16), (4, 1, fitenc.UINT32)])
    w.data(0, [4, 1, 2697, 1_000_000_000])
    w.define(1, 20, [(253, 1, fitenc.UINT32), (3, 1, fitenc.UINT8)])
    w.define(2, 78, [(0, 5, fitenc.UINT16)])
    t0 = 1_000_000_000
    beat = 0.0
    n_rr = 0
    for sec in range(minutes * 60):
        w.data(1, [t0 + sec, int(rng.integers(60, 160))])
        rr = []
        while beat < sec + 1:
            x = int(rng.normal(700, 40))
            beat += x / 1000
            rr.append(x)
        for i in range(0, len(rr), 5):
            w.data(2, [rr[i : i + 5]])
        n_rr += len(rr)
    data = w.to_bytes()
    path = Path("/tmp/sw-bench-fit.fit")
    path.write_bytes(data)
    mb = len(data) / 1e6

    def reference():
        with fitdecode.FitReader(str(path)) as r:
            for _ in r:
                pass

    runs = {
        "reference: fitdecode.FitReader iterating every frame (default processor)": reference,
        "decode_fit (fitdecode, raw values, our time arithmetic)": lambda: decode_fit(data, source=str(path)),
        "FitSource (decode + samples frame + plausibility)": lambda: list(FitSource(path, user="bench").batches()),
    }
    # interleaved, best of 5: on a shared machine, load changes between runs hit all three alike
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(5):
        for what, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[what] = min(best[what], time.perf_counter() - t)
    n = minutes * 60 + n_rr
    print(f"FIT activity: {minutes} min, {minutes * 60:,} records, {n_rr:,} RR intervals, {mb:.2f} MB\n")
    print("| what | time | MB/s | samples/s |\n|---|---|---|---|")
    for what, secs in best.items():
        print(f"| {what} | {secs:.2f} s | {mb / secs:.2f} | {n / secs:,.0f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("apple")
    a.add_argument("--size-mb", type=int, default=1024)
    a.add_argument("--dir", type=Path, default=Path("/tmp/sw-bench"))
    f = sub.add_parser("fit")
    f.add_argument("--minutes", type=int, default=600)
    args = ap.parse_args()
    if args.what == "apple":
        bench_apple(args.size_mb, args.dir)
    else:
        bench_fit(args.minutes)


if __name__ == "__main__":
    main()
