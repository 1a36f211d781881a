"""The engine's ingest log: what was synced reads back in order after a crash; a torn or
corrupt tail ends the records (it was never acknowledged); covered segments are deleted."""

import threading
from pathlib import Path

from hypothesis import given, settings, strategies as st

from stresswatch.engine.ingest_log import IngestLog, LogEntry, read_segment

payloads = st.lists(st.tuples(st.sampled_from(["alice", "bob", "zoë"]), st.binary(max_size=200)), max_size=20)


def write_all(folder: Path, items) -> tuple[IngestLog, list[LogEntry]]:
    done: list[LogEntry] = []
    synced = threading.Event()
    log = IngestLog(folder, lambda group: (done.extend(group), synced.set()))
    log.start()
    for user, payload in items:
        log.append(LogEntry(user, payload, None))
    log.close()
    return log, done


@settings(max_examples=30, deadline=None)
@given(items=payloads, tail=st.binary(max_size=64))
def test_synced_records_read_back_in_order_whatever_garbage_follows(tmp_path_factory, items, tail):
    folder = tmp_path_factory.mktemp("log")
    _, done = write_all(folder, items)
    assert [(e.user, e.payload) for e in done] == items  # every entry reported durable, in order
    (seg,) = sorted(folder.glob("*.log"))
    with open(seg, "ab") as f:
        f.write(tail)  # a crash mid-write, or garbage
    back = list(read_segment(seg))
    assert [(r.user, r.payload) for r in back[: len(items)]] == items
    assert [r.seq for r in back[: len(items)]] == list(range(1, len(items) + 1))


def test_recover_replays_after_the_snapshot_and_sequence_numbers_go_on(tmp_path):
    write_all(tmp_path, [("alice", b"1"), ("bob", b"2"), ("alice", b"3")])
    log = IngestLog(tmp_path, lambda group: None)
    assert [(r.seq, r.payload) for r in log.recover(after_seq=1)] == [(2, b"2"), (3, b"3")]
    got: list[LogEntry] = []
    log = IngestLog(tmp_path, got.extend)
    list(log.recover(0))
    log.start()
    log.append(LogEntry("bob", b"4", None))
    log.close()
    assert [e.seq for e in got] == [4]


def test_a_snapshot_deletes_only_segments_it_covers(tmp_path):
    log = IngestLog(tmp_path, lambda group: None)
    log.start()
    log.append(LogEntry("alice", b"1", None))
    log.rotate()
    log.append(LogEntry("alice", b"2", None))
    log.rotate()
    log.close()
    assert len(list(tmp_path.glob("*.log"))) == 3
    log = IngestLog(tmp_path, lambda group: None)
    list(log.recover(0))
    assert log.truncate_through(1) == 2  # the first (seq 1 only) and the empty last one
    assert [r.seq for r in log.recover(0)] == [2]


def test_a_duplicate_is_reported_durable_without_a_record(tmp_path):
    _, done = write_all(tmp_path, [("alice", b"1")])
    log = IngestLog(tmp_path, done.extend)
    list(log.recover(0))
    log.start()
    log.append(LogEntry("", None, "dup"))
    log.close()
    assert done[-1].ref == "dup" and [r.seq for r in log.recover(0)] == [1]


def test_erasure_rewrites_the_log_without_the_user(tmp_path):
    write_all(tmp_path, [("alice", b"a1"), ("bob", b"b1"), ("alice", b"a2")])
    log = IngestLog(tmp_path, lambda group: None)
    list(log.recover(0))
    log.start()
    log.append(LogEntry("bob", b"b2", None))
    log.erase("alice")
    log.close()
    assert [(r.user, r.payload) for r in log.recover(0)] == [("bob", b"b1"), ("bob", b"b2")]
    assert b"a1" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_erasure_racing_a_snapshots_truncation_keeps_the_log_alive(tmp_path, monkeypatch):
    """A snapshot may delete a covered segment (another thread) while an erasure rewrites the
    segments: the log's thread must survive, later batches must still become durable, and no
    deleted segment may come back."""
    import stresswatch.engine.ingest_log as ingest_log

    write_all(tmp_path, [("alice", b"a1"), ("bob", b"b1")])  # segment 1: seq 1-2
    durable: list[LogEntry] = []
    synced = threading.Event()
    log = IngestLog(tmp_path, lambda group: (durable.extend(group), synced.set()))
    list(log.recover(0))
    real_read = ingest_log.read_segment
    raced = threading.Event()

    def read_while_a_snapshot_truncates(path):
        if not raced.is_set():
            raced.set()  # the snapshot covering seq 2 lands now, from its own thread
            t = threading.Thread(target=log.truncate_through, args=(2,))
            t.start()
            t.join(timeout=0.5)  # it may have to wait for the rewrite: then it deletes after it
        return real_read(path)

    monkeypatch.setattr(ingest_log, "read_segment", read_while_a_snapshot_truncates)
    log.start()
    log.erase("alice")
    log.append(LogEntry("bob", b"b2", None))
    assert synced.wait(5), "the ingest log stopped: a batch after the erasure never became durable"
    log.close()
    assert raced.is_set()
    monkeypatch.setattr(ingest_log, "read_segment", real_read)
    assert [(r.user, r.payload) for r in log.recover(0)] == [("bob", b"b2")]  # segment 1 stays deleted
    assert b"a1" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_a_restart_knows_every_logged_batch_but_replays_only_what_the_snapshot_lacks(tmp_path):
    """Records the snapshot holds are read by their header only (decoding every logged sample
    took ~30 s at 100,000 users) but still recognised when the broker delivers them again."""
    from stresswatch.alerts.topics import Topics
    from stresswatch.engine.intake import Intake
    from stresswatch.ingest import Deduplicator, IngestBatch

    t0 = 1_764_000_000 * 10**9
    batches = [
        IngestBatch(user=u, stream_id="s", seq=k, source="t", time_ns=[t0 + k * 10**9], metric=["hr_bpm"], value=[60.0 + k])
        for k, u in enumerate(["alice", "bob", "alice", "bob"])
    ]
    payloads = [b.encode_binary() for b in batches[:3]] + [batches[3].model_dump_json().encode()]  # JSON too
    write_all(tmp_path, [(b.user, p) for b, p in zip(batches, payloads)])
    intake = Intake(tmp_path, Topics(), lambda batch, seq: None)
    applied: list[tuple[str, int, int]] = []
    n = intake.recover(2, lambda batch, seq: applied.append((batch.user, batch.seq, seq)), held=lambda user, seq: user == "alice" and seq <= 3)
    assert n == 1 and applied == [("bob", 3, 4)]  # seq 1-2 in the snapshot, seq 3 held by alice's chunk
    known = Deduplicator()
    for b in intake._kept:
        known.first_time(b)
    assert all(known.seen(b) for b in batches)  # a redelivery of any of them is dropped
