"""The engine's per-user tables as arrays indexed by its user numbers: the consent cache and the
status topics answer as the ledger does, and a bulk load at start equals one read per user.
A real SQLite consent ledger."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from stresswatch.alerts.topics import Topics
from stresswatch.consent.ledger import ConsentLedger
from stresswatch.consent.state import Action, ConsentEvent
from stresswatch.engine.consent_cache import ConsentCache
from stresswatch.engine.status import StatusPublisher, user_status

T0 = datetime(2026, 5, 4, 10, 0, tzinfo=timezone.utc)


def ledger_with(path: Path) -> ConsentLedger:
    """ann active, bob paused, cy revoked, dee expiring at T0 + 1 h, eve never asked."""
    ledger = ConsentLedger(path)
    for user in ("ann", "bob", "cy"):
        ledger.append(ConsentEvent(user, Action.GRANT, T0, "test", recipients=("sam",)))
    ledger.append(
        ConsentEvent("dee", Action.GRANT, T0, "test", recipients=("sam",), expires_at=T0 + timedelta(hours=1, microseconds=7), timezone="Europe/Berlin")
    )
    ledger.append(ConsentEvent("bob", Action.PAUSE, T0 + timedelta(minutes=1), "test"))
    ledger.append(ConsentEvent("cy", Action.REVOKE, T0 + timedelta(minutes=1), "test"))
    return ledger


def test_the_consent_cache_answers_as_the_ledger_at_any_time(tmp_path: Path):
    ledger = ledger_with(tmp_path / "ledger.sqlite")
    users = ["ann", "bob", "cy", "dee", "eve"]
    bulk = ConsentCache(ledger)
    assert bulk.load(ledger.iter_states()) == ["ann", "bob", "cy", "dee"]
    lazy = ConsentCache(ledger)  # one ledger read per user, on first use
    for now in (T0 + timedelta(minutes=5), T0 + timedelta(hours=1), T0 + timedelta(days=3)):
        want = [ledger.state(u).allows_processing(now) for u in users]
        assert [lazy.may_process(u, now) for u in users] == want
        assert [bulk.may_process(u, now) for u in users] == want
        assert bulk.processing_users(users, now).tolist() == want
    assert [bulk.paused(u) for u in users] == [False, True, False, False, False]
    for cache in (bulk, lazy):  # what the hot path reads: status, expiry, zone
        for u in users:
            want_state, got = ledger.state(u), cache.state(u)
            assert (got.status, got.expires_at, got.timezone) == (want_state.status, want_state.expires_at, want_state.timezone)


def test_a_dropped_entry_is_read_again_from_the_ledger(tmp_path: Path):
    ledger = ledger_with(tmp_path / "ledger.sqlite")
    cache = ConsentCache(ledger)
    now = T0 + timedelta(minutes=5)
    assert cache.may_process("ann", now)
    ledger.append(ConsentEvent("ann", Action.REVOKE, now, "test"))
    assert cache.may_process("ann", now)  # cached until the engine hears of the change
    cache.drop("ann")
    assert not cache.may_process("ann", now)


def test_statuses_are_published_on_change_swept_in_slices_and_cleared(tmp_path: Path):
    ledger = ledger_with(tmp_path / "ledger.sqlite")
    cache = ConsentCache(ledger)
    sent: list[tuple[str, bytes]] = []
    ready = {"ann"}
    status = StatusPublisher(Topics(), cache, lambda u: u in ready, lambda t, b: sent.append((t, b)), sweep_size=2)
    now = T0 + timedelta(minutes=5)
    users = cache.load(ledger.iter_states())
    status.announce(users, now)
    assert [status.known(u) for u in ("ann", "bob", "cy", "dee", "eve")] == ["active", "paused", "off", "calibrating", None]
    assert [status.known(u) for u in users] == [user_status(ledger.state(u), now, u in ready) for u in users]
    assert len(sent) == 4
    status.after_flush(["ann", "dee"], now)  # nothing changed: nothing published
    assert len(sent) == 4
    ready.add("dee")
    status.after_flush(["dee"], now)  # calibration over
    assert status.known("dee") == "active" and len(sent) == 5
    later = T0 + timedelta(hours=2)  # dee's consent expired: found by the sweep, two users a tick
    for _ in range(2):
        status.sweep(later)
    assert status.known("dee") == "off" and sent[-1][0] == Topics().status("dee")
    status.clear("bob")
    assert status.known("bob") is None and sent[-1] == (Topics().status("bob"), b"")


def test_a_bulk_read_in_progress_never_overwrites_a_newer_entry(tmp_path: Path):
    """The start-up read runs on its own thread; a consent message applied meanwhile (the cache
    entry dropped, the ledger read again) is newer than the slice that arrives after it."""
    ledger = ledger_with(tmp_path / "ledger.sqlite")
    cache = ConsentCache(ledger)
    cache.begin_load()
    stale = list(ledger.iter_states())  # read before ann revoked
    now = T0 + timedelta(minutes=5)
    ledger.append(ConsentEvent("ann", Action.REVOKE, now, "test"))
    cache.drop("ann")  # what the consent handler does
    assert not cache.may_process("ann", now)
    assert cache.load(stale) == ["bob", "cy", "dee"]  # ann's stale grant is not applied
    cache.end_load()
    assert not cache.may_process("ann", now) and cache.may_process("bob", now)


def test_the_sweeps_bulk_read_equals_one_read_per_user(tmp_path: Path, monkeypatch):
    """The sweep reads its slice of the ledger in queries of several users: every user's
    history, in chunks (two users a query here), is what one read per user gives, including a
    user with none; a revocation written by another process is seen by the next sweep."""
    import stresswatch.consent.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "IN_CHUNK", 2)
    path = tmp_path / "ledger.sqlite"
    ledger = ledger_with(path)
    users = ["eve", "dee", "ann", "cy", "bob"]
    got = ledger.events_of(users)
    assert list(got) == users
    assert {u: got[u] for u in users} == {u: ledger.events(u) for u in users}
    cache = ConsentCache(ledger)
    sent: list[tuple[str, bytes]] = []
    status = StatusPublisher(Topics(), cache, lambda u: True, lambda t, b: sent.append((t, b)), sweep_size=10)
    now = T0 + timedelta(minutes=5)
    status.announce(cache.load(ledger.iter_states()), now)
    assert status.known("ann") == "active"
    with ConsentLedger(path) as other:  # another process's connection
        other.append(ConsentEvent("ann", Action.REVOKE, now, "test"))
    status.sweep(now)
    assert status.known("ann") == "off" and not cache.may_process("ann", now)
    assert [status.known(u) for u in ("bob", "cy", "dee")] == ["paused", "off", "active"]
