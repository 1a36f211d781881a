"""What the engine's persistence costs at N users: storing a save's samples, and (``start``)
engine start and memory with N seeded users.

``python benchmarks/bench_state.py samples --users 10000 100000``
    One engine save's samples (``--rows`` RR samples per user, default 60: a minute of a
    chest strap) written by the bulk store (``SampleStore.append``, what the engine's sample
    writer does) against the reference in the same run: the per-user store of the previous
    version (one ``add`` per user, read from git history ``--reference-rev``), timed on the
    first ``--reference-users`` users and reported per user (it is O(users)).

``python benchmarks/bench_state.py tables --users 100000``
    Bytes per user of the engine's per-user tables (de-duplication floors, consent cache,
    published statuses), by tracemalloc.

``python benchmarks/bench_state.py start --users 10000 100000``
    The real ``Engine.start()`` plus the start-up jobs queued by then (status announce, outbox
    pump) in a process of its own, against a fresh Mosquitto on a free loopback port, with N
    users seeded as the load harness seeds them (consenting, calibrated detector state tiled
    from a real detector, as a single-blob snapshot); then the engine's RSS above the bare
    interpreter (per user), the detector's share, an incremental save of every user through
    the engine's own save turns (longest engine-thread turn, time, RSS it adds) against the
    previous version's full save in the same process (the copy on the engine thread,
    serialising, one blob), and the stop with its final save. A second process then restarts
    from the chunks that stop saved: start and live time, RSS (line ``"phase": "chunks"``).

Every figure is printed with the machine's load average; product defaults throughout.
"""

from __future__ import annotations

import argparse
import getpass
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
T0 = datetime(2026, 5, 4, 10, 0, tzinfo=timezone.utc)


def header(kind: str) -> None:
    print(f"# bench_state {kind}: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} {os.cpu_count()} cores, "
          f"python {platform.python_version()}, polars {pl.__version__}, load {os.getloadavg()[0]:.2f}/{os.getloadavg()[1]:.2f}/{os.getloadavg()[2]:.2f}")  # fmt: skip


def flush_frame(users: int, rows: int) -> pl.DataFrame:
    """A save's samples: ``rows`` RR samples, one a second, for each of ``users`` users."""
    from stresswatch.model import SAMPLES_SCHEMA

    n = users * rows
    idx = np.arange(n)
    names = pl.Series([f"u{i:07d}" for i in range(users)]).gather(idx // rows)
    return pl.DataFrame(
        {
            "user": names,
            "time": pl.Series(np.datetime64(T0.replace(tzinfo=None), "ns") + (idx % rows).astype("timedelta64[s]")).dt.replace_time_zone("UTC"),
            "metric": pl.Series(["rr_ms"]).gather(np.zeros(n, np.int64)),
            "value": 800.0 + (idx % 97),
            "source": pl.Series(["ble_hrs/strap"]).gather(np.zeros(n, np.int64)),
        }
    ).cast(dict(SAMPLES_SCHEMA))


def reference_store(rev: str) -> type | None:
    """The per-user ``SampleStore`` of ``rev`` (git history), or None outside a checkout."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:src/stresswatch/store.py"], cwd=HERE, capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "stresswatch_store_reference.py"
    path.write_text(src.replace("from .", "from stresswatch."))
    spec = importlib.util.spec_from_file_location("stresswatch_store_reference", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.SampleStore  # type: ignore[no-any-return]


def bench_samples(a: argparse.Namespace) -> None:
    from stresswatch.store import SampleStore

    header("samples")
    ref = reference_store(a.reference_rev)
    per_user_ref = None
    if ref is not None:
        frame = flush_frame(a.reference_users, a.rows)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            ref(d).add(frame)  # one add for all users: the old engine's save
            per_user_ref = (time.perf_counter() - t) / a.reference_users
        print(f"reference ({a.reference_rev}, per-user files): {a.reference_users} users x {a.rows} rows in one add: "
              f"{per_user_ref * 1e3:.2f} ms per user")  # fmt: skip
    else:
        print("reference: not available (no git history)")
    for n in a.users:
        frame = flush_frame(n, a.rows)
        with tempfile.TemporaryDirectory() as d:
            store = SampleStore(d)
            t = time.perf_counter()
            store.append(frame)
            took = time.perf_counter() - t
            size = sum(f.stat().st_size for f in store.files())
            t = time.perf_counter()
            one = store.read("u0000042")
            read_s = time.perf_counter() - t
        ref_txt = f"; reference extrapolated {per_user_ref * n:.1f} s ({per_user_ref * n / took:.0f}x)" if per_user_ref else ""
        print(json.dumps({"users": n, "rows": frame.height, "append_s": round(took, 3), "bytes_per_row": round(size / frame.height, 2),
                          "read_one_user_s": round(read_s, 3), "rows_read": one.height}) + ref_txt)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_start(a: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE / "load"))
    from users import Plan, calibrate, detector_blob, load_templates, seed_consent  # type: ignore[import-not-found]

    from stresswatch.alerts.outbox import Outbox
    from stresswatch.broker import mosquitto_conf
    from stresswatch.config import DetectorSettings, Settings

    header("start")
    det = DetectorSettings()
    templates, frame = load_templates()
    template = calibrate(frame, templates, det)
    for n in a.users:
        work = Path(tempfile.mkdtemp(prefix=f"swstate-{n}-"))
        port = _free_port()
        (work / "mq").mkdir()
        text = mosquitto_conf(port=port, data_dir=work / "mq", allow_anonymous=True, run_as=getpass.getuser())
        (work / "mq.conf").write_text(text)
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mq.conf")], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            url = f"mqtt://127.0.0.1:{port}"
            state = work / "state"
            settings = Settings.model_validate({"mqtt": {"url": url, "client_id": "bench-state"}, "detector": det.model_dump(), "store": {"state_dir": str(state)}})
            plan = Plan.make(n, 60.0, det.window_s, 100, time.time() + 30, 210.0, templates)
            now = datetime.now(timezone.utc)
            state.mkdir(parents=True)
            seed_consent(settings.store.db_path, plan, ["w0", "w1"], now)
            ob = Outbox(settings.store.db_path)
            ob.save_detector(detector_blob(template, templates, plan, det), now)
            ob.close()
            (work / "settings.json").write_text(settings.model_dump_json())
            # the engine in a process of its own, so that its memory is its own; then a restart
            for phase in ("seeded", "chunks"):
                out = subprocess.run([sys.executable, __file__, "_engine", str(work / "settings.json"), str(state), url, phase], capture_output=True, text=True, check=False)
                if out.returncode:
                    print(f"engine failed: {out.stderr[-2000:]}")
                    break
                res = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"users": n, **res, "load": [round(x, 2) for x in os.getloadavg()]}))
        finally:
            broker.terminate()
            broker.wait(10)
            shutil.rmtree(work, ignore_errors=True)


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def _reset_peak() -> None:
    """Start a new RSS high-water mark (VmHWM) from here (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _drain(eng: object, until: object) -> None:
    """Run the engine's queued jobs (save turns among them) until ``until()``."""
    while not until():  # type: ignore[operator]
        eng._run_queued(until_stopped=False)  # type: ignore[attr-defined]
        time.sleep(0.001)


def engine_child(settings_path: str, state: str, url: str, phase: str = "seeded") -> None:
    """Start the engine (as ``stresswatch engine`` does), run its start-up jobs, report.

    ``seeded``: from the state as seeded (a single-blob snapshot, as earlier versions saved
    it); then one save of every user in chunks through the engine's own turns (the longest
    engine-thread turn, the save's time and the RSS it adds), the previous version's full
    save in the same process (copy on the engine thread, serialise, one blob) for
    comparison, and the stop's final save. ``chunks``: a restart from what that stop saved."""
    from stresswatch.config import Settings
    from stresswatch.detect.detector import serialise_state
    from stresswatch.engine import Engine

    settings = Settings.model_validate(json.loads(Path(settings_path).read_text()))
    eng = Engine(settings, url=url, state_dir=Path(state))
    base_kb = _status_kb("VmRSS")  # the interpreter and libraries, before any state
    t = time.perf_counter()
    eng.start()
    started = time.perf_counter() - t
    for _ in range(eng._queue.qsize()):  # the jobs start() queued (announce, pump): then ingest runs
        eng._run_job(eng._queue.get_nowait())
    live = time.perf_counter() - t
    loader = getattr(eng, "_consent_loader", None)  # this version reads consent on a thread of its own
    while True:  # the consent slices and status announce they queue
        eng._run_queued(until_stopped=False)
        if loader is None or not loader.is_alive():
            eng._run_queued(until_stopped=False)
            break
        time.sleep(0.01)
    announced = time.perf_counter() - t
    n = len(eng.pipeline.detector.users)
    rss_kb = _status_kb("VmRSS") - base_kb
    peak_start_kb = _status_kb("VmHWM") - base_kb
    det = eng.pipeline.detector
    res: dict[str, object] = {
        "phase": phase, "start_s": round(started, 2), "live_s": round(live, 2), "all_statuses_s": round(announced, 2),
        "engine_rss_mb": round(rss_kb / 1024, 1), "rss_kb_per_user": round(rss_kb / n, 2),
        "start_peak_rss_kb_per_user": round(peak_start_kb / n, 2), "detector_state_b_per_user": det.state_bytes_per_user(),
    }  # fmt: skip
    if phase == "seeded":
        p = eng.persister
        det.mark_all_dirty()  # every user saved (each streams once a minute at full load)
        _reset_peak()
        before_kb = _status_kb("VmRSS")
        t = time.perf_counter()
        eng.persist()  # a scheduled save: turns queued on the engine thread, written on the snapshot thread
        _drain(eng, lambda: not p.saving)
        res["chunked_save_s"] = round(time.perf_counter() - t, 2)
        res["chunked_save_longest_turn_ms"] = round(p.longest_turn_s * 1000, 1)
        res["chunked_save_turns"] = p.turns
        res["chunked_save_turns_s"] = round(p.turns_s, 2)  # engine thread, all turns
        res["chunked_save_write_s"] = round(p.write_s, 2)  # snapshot thread: serialise, write, fsync
        res["chunked_save_peak_extra_mb"] = round((_status_kb("VmHWM") - before_kb) / 1024, 1)
        files = [p.files.path(c) for c in p.files.chunks()]
        res["chunks"] = len(files)
        res["chunks_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        # the previous version's save, same process, same state: the copy held the engine thread
        _reset_peak()
        before_kb = _status_kb("VmRSS")
        t = time.perf_counter()
        arrays = det.state_arrays()
        res["full_save_copy_s"] = round(time.perf_counter() - t, 2)
        blob = serialise_state(arrays).getbuffer()
        from stresswatch.alerts.outbox import Outbox

        with Outbox(Path(state) / "full-blob-reference.sqlite") as ob:
            ob.save_detector(blob, datetime.now(timezone.utc), ingest_seq=0)
        res["full_save_s"] = round(time.perf_counter() - t, 2)
        res["full_save_peak_extra_mb"] = round((_status_kb("VmHWM") - before_kb) / 1024, 1)
        res["snapshot_mb"] = round(len(blob) / 2**20, 1)
        del arrays, blob
        (Path(state) / "full-blob-reference.sqlite").unlink()
        # stop: a final save of what changed (every user again: all stream), then the rest of shutdown
        det.mark_all_dirty()
        t = time.perf_counter()
        eng.request_stop()
        eng.persist(wait=True)  # what shutdown does first (after closing ingest): every chunk
        res["stop_final_save_s"] = round(time.perf_counter() - t, 2)
        eng.shutdown()
        res["stop_with_final_save_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(res))
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's slow teardown of a large heap


def bench_tables(a: argparse.Namespace) -> None:
    """Bytes per user of the de-duplication floors, the consent cache and the published
    statuses at N users (tracemalloc; the users' id and stream-id strings held by the batches
    are not counted, in either version). ``PYTHONPATH=<old checkout>/src`` for the reference."""
    import uuid

    from stresswatch.alerts.topics import Topics
    from stresswatch.consent.ledger import ConsentLedger
    from stresswatch.consent.state import Action, ConsentEvent
    from stresswatch.engine.consent_cache import ConsentCache
    from stresswatch.engine.status import StatusPublisher
    from stresswatch.ingest import Deduplicator
    from stresswatch.wire.ingest import IngestBatch
    header("tables")
    N = a.users
    now = datetime.now(timezone.utc)
    d = tempfile.mkdtemp()
    led = ConsentLedger(Path(d) / "l.sqlite")
    led._db.execute("PRAGMA synchronous=OFF")
    with led.transaction():
        for i in range(N):
            u = f"u{i:07d}"
            led.append(ConsentEvent(u, Action.GRANT, now, "load", recipients=("w0",), display_name=u, event_id=f"load-{u}"))

    def fresh(i: int) -> str:  # a new str each time, as a decoded batch brings
        return "u" + str(i).zfill(7)

    batches = [IngestBatch(user=fresh(i), stream_id=uuid.uuid4().hex, seq=0, source="s", time_ns=[], metric=[], value=[]) for i in range(N)]
    tracemalloc.start()
    dd = Deduplicator()
    for b in batches:
        dd.first_time(b)
    dedup = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    tracemalloc.start()
    cache = ConsentCache(led)
    for i in range(N):
        cache.may_process(fresh(i), now)
    consent = tracemalloc.get_traced_memory()[0]
    sp = StatusPublisher(Topics(), cache, lambda u: True, lambda t, b: None)
    for i in range(N):
        sp.update(fresh(i), now)
    both = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(json.dumps({"users": N, "dedup_floors_b_per_user": round(dedup / N), "consent_cache_b_per_user": round(consent / N),
                      "status_b_per_user": round((both - consent) / N), "total_b_per_user": round((dedup + both) / N)}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("samples")
    s.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    s.add_argument("--rows", type=int, default=60)
    s.add_argument("--reference-rev", default="f44c7e3")
    s.add_argument("--reference-users", type=int, default=500)
    st = sub.add_parser("start")
    st.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    if len(sys.argv) > 1 and sys.argv[1] == "_engine":
        engine_child(*sys.argv[2:6])
        return
    t = sub.add_parser("tables")
    t.add_argument("--users", type=int, default=100_000)
    a = ap.parse_args()
    {"samples": bench_samples, "start": bench_start, "tables": bench_tables}[a.what](a)


if __name__ == "__main__":
    main()
