"""Detector: alerts on the demo cohort, streaming equals batch, save/restore."""

from datetime import datetime, timezone

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stresswatch.config import DetectorSettings
from stresswatch.detect import Detector
from stresswatch.model import SAMPLES_SCHEMA, Reason
from stresswatch.replay import read_samples, time_batches

SMALL = DetectorSettings(window_s=60, baseline_windows=60, baseline_min_windows=30, baseline_refresh_s=600, sustain_windows=3, exit_windows=2, cooldown_s=600)
# 5-minute windows decided every minute (trailing windows over carried minutes), as shipped;
# the synthetic episode is an instant step of HR, which the shape rule for sources without
# motion data would take for the onset of a walk: off here
TRAILING = DetectorSettings(
    window_s=300, baseline_windows=12, baseline_min_windows=6, baseline_refresh_s=600, cusum_h=2.0, exit_windows=2, cooldown_s=600,
    activity_hr_span_without_motion=1.0,
)
T0 = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() * 1e9)


def synthetic(seed: int = 3) -> pl.DataFrame:
    """Two people, 2 hours of beats; 'a' has a 15-minute episode (HR +20 %, RMSSD -60 %) at 90 min."""
    rng = np.random.default_rng(seed)
    frames = []
    for user, episode in (("a", True), ("b", False)):
        n = 9000
        t = np.arange(n) * 0.8
        hot = episode & (t >= 5400) & (t < 6300)
        rr = np.where(hot, 800 / 1.2, 800) + np.where(hot, 12, 30) * rng.standard_normal(n)
        t = np.cumsum(rr) / 1000.0
        keep = t < 7200
        frames.append(
            pl.DataFrame(
                {"user": user, "time": T0 + (t[keep] * 1e9).astype(np.int64), "metric": "rr_ms", "value": rr[keep], "source": "t"}
            )
        )
    return pl.concat(frames).with_columns(pl.col("time").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC")).sort("time", "user")


SYN = synthetic()


def batch_pass(frame: pl.DataFrame, s: DetectorSettings = SMALL):
    d = Detector(s)
    a = d.update(frame)
    b = d.flush()
    return pl.concat([a.windows, b.windows]).sort("user", "window_start"), a.alerts + b.alerts


def test_synthetic_episode_raises_one_alert_with_reasons():
    windows, alerts = batch_pass(SYN)
    assert [a.user for a in alerts] == ["a"]
    al = alerts[0]
    assert set(al.reasons) == {Reason.HRV_BELOW_BASELINE, Reason.HR_ABOVE_BASELINE}
    assert datetime(2026, 3, 2, 1, 30, tzinfo=timezone.utc) <= al.episode_start < al.raised_at
    # sustained evidence: raised no earlier than `sustain_windows` windows into the episode
    assert (al.raised_at - al.episode_start).total_seconds() >= SMALL.sustain_windows * SMALL.window_s
    assert (windows.filter(pl.col("user") == "b")["state"] != "elevated").all()
    assert windows.filter(pl.col("user") == "a")["state"].head(SMALL.baseline_min_windows).eq("calibrating").all()


def test_no_alert_while_calibrating():
    s = DetectorSettings(**{**SMALL.model_dump(), "baseline_min_windows": 60})  # a full hour of calibration
    windows, alerts = batch_pass(SYN.filter(pl.col("time") < pl.lit(datetime(2026, 3, 2, 1, 0, tzinfo=timezone.utc))), s)
    assert alerts == []
    assert set(windows["state"]) <= {"calibrating", "insufficient_data"}


def test_demo_cohort_alerts_exactly_the_two_stressed_people(demo_cohort):
    samples = read_samples([demo_cohort])
    d = Detector()
    alerts = []
    for b in time_batches(samples):
        alerts += d.update(b).alerts
    alerts += d.flush().alerts
    assert sorted(a.user for a in alerts) == ["alice", "carol"]
    labels = pl.read_csv(demo_cohort.with_name("demo_cohort_labels.csv"), try_parse_dates=True)
    for a in alerts:
        lab = labels.filter(pl.col("user") == a.user).row(0, named=True)
        assert lab["start"] <= a.raised_at <= lab["end"]


@st.composite
def chunkings(draw):
    """Each user's samples cut at arbitrary points, then the users' chunks interleaved arbitrarily."""
    per_user = []
    for user in ("a", "b"):
        part = SYN.filter(pl.col("user") == user)
        cuts = sorted(draw(st.lists(st.integers(0, part.height), max_size=6)))
        bounds = [0, *cuts, part.height]
        per_user.append([part[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo])
    order = draw(st.permutations([i for i, chunks in enumerate(per_user) for _ in chunks]))
    pos = [0, 0]
    out = []
    for i in order:
        out.append(per_user[i][pos[i]])
        pos[i] += 1
    return out


BATCH_WINDOWS, BATCH_ALERTS = batch_pass(SYN)
SETTINGS = {"1-min windows": SMALL, "5-min windows every minute": TRAILING}
BATCH = {"1-min windows": (BATCH_WINDOWS, BATCH_ALERTS), "5-min windows every minute": batch_pass(SYN, TRAILING)}


def test_trailing_windows_decide_within_minutes_and_output_the_aligned_windows():
    windows, alerts = BATCH["5-min windows every minute"]
    assert windows.filter(pl.col("user") == "a").height == 24  # 2 hours of 5-minute windows, not one per minute
    assert all(ts.timestamp() % 300 == 0 for ts in windows["window_start"].to_list())
    assert [a.user for a in alerts] == ["a"]
    a = alerts[0]
    # decided at the end of a minute, before the first window holding the onset (01:30) is over
    assert datetime(2026, 3, 2, 1, 30, tzinfo=timezone.utc) < a.raised_at < datetime(2026, 3, 2, 1, 35, tzinfo=timezone.utc)
    assert a.raised_at.second == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunkings())
@pytest.mark.parametrize("name", list(SETTINGS))
def test_streaming_equals_batch_for_any_chunking_and_interleaving(name, chunks):
    s = SETTINGS[name]
    d = Detector(s)
    windows, alerts = [], []
    for c in chunks:
        out = d.update(c)
        windows.append(out.windows)
        alerts += out.alerts
    out = d.flush()
    windows.append(out.windows)
    alerts += out.alerts
    got = pl.concat(windows).sort("user", "window_start")
    want_windows, want_alerts = BATCH[name]
    assert got.equals(want_windows)
    assert sorted(alerts, key=lambda a: a.alert_id) == sorted(want_alerts, key=lambda a: a.alert_id)


@pytest.mark.parametrize("cut", [1000, 7000, 12000])
def test_save_and_restore_gives_identical_results(cut):
    d = Detector(SMALL)
    first = d.update(SYN[:cut])
    restored = Detector.from_bytes(d.to_bytes(), SMALL)
    second = restored.update(SYN[cut:])
    last = restored.flush()
    got = pl.concat([first.windows, second.windows, last.windows]).sort("user", "window_start")
    assert got.equals(BATCH_WINDOWS)
    assert first.alerts + second.alerts + last.alerts == BATCH_ALERTS


def test_late_samples_are_dropped_and_counted():
    d = Detector(SMALL)
    d.update(SYN.filter(pl.col("user") == "a")[:3000])
    late = SYN.filter(pl.col("user") == "a")[:10].select(list(SAMPLES_SCHEMA))
    out = d.update(late)
    assert out.windows.height == 0
    assert d.late_samples == 10


# -- episode state machine: the vectorised scan equals a window-by-window reference ----------

def reference_episodes(scores, *, enter, exit_, sustain, exit_windows, cooldown_w):
    """The documented rules, one window at a time (window i starts at i, ends at i + 1)."""
    run = calm = 0
    run_start = None
    in_ep = False
    last_alert = None
    out = []
    for i, sc in enumerate(scores):
        hot = sc is not None and sc >= enter
        cool = sc is not None and sc < exit_
        if hot:
            run_start = i if run == 0 else run_start
            run += 1
        else:
            run = 0
        calm = calm + 1 if cool else 0
        if in_ep and calm >= exit_windows:
            in_ep = False
        alert = False
        if not in_ep and run >= sustain:
            in_ep = True
            if last_alert is None or (i + 1) - last_alert >= cooldown_w:
                alert = True
                last_alert = i + 1
        out.append((in_ep, alert, run_start if alert else None))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.sampled_from([-1.0, 0.5, 1.0, 1.5, 2.0, 3.0])), min_size=1, max_size=60),
    st.lists(st.integers(1, 59), max_size=4),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 10),
)
def test_episode_scan_equals_sequential_rules_in_any_chunking(scores, cuts, sustain, exit_windows, cooldown_w):
    from stresswatch.detect.episodes import EpisodeState, scan

    ref = reference_episodes(scores, enter=2.0, exit_=1.0, sustain=sustain, exit_windows=exit_windows, cooldown_w=cooldown_w)
    state = EpisodeState.empty(2)
    got = []
    bounds = sorted({0, len(scores), *[c for c in cuts if c < len(scores)]})
    for lo, hi in zip(bounds, bounds[1:]):
        # user 1 gets the same scores: users must not influence each other
        sc = np.array([np.nan if x is None else x for x in scores[lo:hi]] * 2)
        u = np.repeat([0, 1], hi - lo)
        t0 = np.tile(np.arange(lo, hi), 2) * 1_000_000_000
        in_ep, alert, ep_start = scan(
            state, u, sc, t0, t0 + 1_000_000_000,
            score_enter=2.0, score_exit=1.0, sustain_windows=sustain, exit_windows=exit_windows, cooldown_s=cooldown_w,
        )
        n = hi - lo
        assert (in_ep[:n] == in_ep[n:]).all() and (alert[:n] == alert[n:]).all()
        got += [(bool(e), bool(a), int(s) // 1_000_000_000 if a else None) for e, a, s in zip(in_ep[:n], alert[:n], ep_start[:n])]
    assert got == ref


# -- richer streaming data: HR-only watch, steps, artefacts, three users -----------------------

def mixed(seed: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    base = SYN.with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(pl.col("value") * 1.6).otherwise(pl.col("value")).alias("value")
    )
    t = np.arange(0, 7200, 5.0)
    watch = pl.DataFrame(
        {"user": "w", "time": T0 + (t * 1e9).astype(np.int64), "metric": "hr_bpm",
         "value": np.round(70 + 3 * rng.standard_normal(len(t)) + 25 * ((t > 3000) & (t < 3900))), "source": "watch"}
    )
    tm = np.arange(60, 7200, 60.0)
    steps = pl.DataFrame(
        {"user": "w", "time": T0 + (tm * 1e9).astype(np.int64), "metric": "steps",
         "value": np.where((tm > 3000) & (tm < 3900), 120.0, 2.0), "source": "watch"}
    )
    extra = pl.concat([watch, steps]).with_columns(pl.col("time").cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"))
    return pl.concat([base, extra]).sort("time", "user")


MIX = mixed()
MIX_WINDOWS, MIX_ALERTS = batch_pass(MIX)
MIX_BATCH = {"1-min windows": (MIX_WINDOWS, MIX_ALERTS), "5-min windows every minute": batch_pass(MIX, TRAILING)}


@st.composite
def mixed_chunkings(draw):
    per_user = []
    users = sorted(set(MIX["user"]))
    for user in users:
        part = MIX.filter(pl.col("user") == user)
        cuts = sorted(draw(st.lists(st.integers(0, part.height), max_size=5)))
        bounds = [0, *cuts, part.height]
        per_user.append([part[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo])
    order = draw(st.permutations([i for i, chunks in enumerate(per_user) for _ in chunks]))
    pos = [0] * len(per_user)
    out = []
    for i in order:
        out.append(per_user[i][pos[i]])
        pos[i] += 1
    restart_at = draw(st.integers(0, len(out)))
    return out, restart_at


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed_chunkings())
@pytest.mark.parametrize("name", list(SETTINGS))
def test_streaming_with_restart_equals_batch_on_mixed_sources(name, plan):
    s = SETTINGS[name]
    chunks, restart_at = plan
    d = Detector(s)
    windows, alerts = [], []
    for i, c in enumerate(chunks):
        if i == restart_at:
            d = Detector.from_bytes(d.to_bytes(), s)
        out = d.update(c)
        windows.append(out.windows)
        alerts += out.alerts
    out = d.flush()
    windows.append(out.windows)
    alerts += out.alerts
    got = pl.concat(windows).sort("user", "window_start")
    want_windows, want_alerts = MIX_BATCH[name]
    assert got.equals(want_windows)
    assert sorted(alerts, key=lambda a: a.alert_id) == sorted(want_alerts, key=lambda a: a.alert_id)


# Users who stop (w after 77.5 minutes) or pause (b for 15 minutes) while others send: ticks then
# finish their windows without any new data of theirs.
_CUT = datetime(2026, 3, 2, 1, 17, 30, tzinfo=timezone.utc)  # inside a 5-min window
_PAUSE = (datetime(2026, 3, 2, 0, 40, tzinfo=timezone.utc), datetime(2026, 3, 2, 0, 55, tzinfo=timezone.utc))
LIVE = MIX.filter(~((pl.col("user") == "w") & (pl.col("time") >= _CUT)) & ~((pl.col("user") == "b") & pl.col("time").is_between(*_PAUSE)))
LIVE_BATCH = {name: batch_pass(LIVE, s) for name, s in SETTINGS.items()}


@st.composite
def live_feeds(draw):
    """A live engine's calls: per-user chunks interleaved, ticks (``advance``) between them at
    times no later than what is still to come allows, a restart."""
    per_user = []
    for user in sorted(set(LIVE["user"])):
        part = LIVE.filter(pl.col("user") == user)
        cuts = sorted(draw(st.lists(st.integers(0, part.height), max_size=8)))
        bounds = [0, *cuts, part.height]
        per_user.append([part[lo:hi] for lo, hi in zip(bounds, bounds[1:]) if hi > lo])
    order = draw(st.permutations([i for i, chunks in enumerate(per_user) for _ in chunks]))
    pos = [0] * len(per_user)
    chunks = []
    for i in order:
        chunks.append(per_user[i][pos[i]])
        pos[i] += 1
    restart_at = draw(st.integers(0, len(chunks)))
    ticks = draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    back_s = draw(st.lists(st.integers(0, 400), min_size=len(chunks), max_size=len(chunks)))
    return chunks, restart_at, ticks, back_s


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(live_feeds())
@pytest.mark.parametrize("max_pieces", [1, 256])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_live_ticks_between_batches_equal_batch(name, max_pieces, monkeypatch, plan):
    """The detector examines only the users whose batches arrived (or whose limit a tick
    passed) and keeps the others' reduced minutes where they are: with ticks in between, any
    chunking and a restart, windows and alerts are still those of one batch pass."""
    import stresswatch.detect.detector as detector_module

    monkeypatch.setattr(detector_module, "MAX_PCHUNKS", max_pieces)
    s = SETTINGS[name]
    chunks, restart_at, ticks, back_s = plan
    grace_s = 60
    d = Detector(s)
    windows, alerts = [], []
    for i, c in enumerate(chunks):
        if i == restart_at:
            d = Detector.from_bytes(d.to_bytes(), s)
        outs = [d.update(c)]
        later = chunks[i + 1 :]
        if ticks[i] and later:
            # a tick may finish only minutes that no batch still to come has samples in
            next_ns = min(int(x["time"].min().timestamp() * 1e9) for x in later)
            outs.append(d.advance(next_ns + grace_s * 1_000_000_000 - back_s[i] * 1_000_000_000, grace_s=grace_s))
        for out in outs:
            windows.append(out.windows)
            alerts += out.alerts
    out = d.flush()
    windows.append(out.windows)
    alerts += out.alerts
    assert d.late_samples == 0
    got = pl.concat(windows).sort("user", "window_start")
    want_windows, want_alerts = LIVE_BATCH[name]
    assert got.equals(want_windows)
    assert sorted(alerts, key=lambda a: a.alert_id) == sorted(want_alerts, key=lambda a: a.alert_id)


@pytest.mark.parametrize("tick_at", [datetime(2026, 3, 2, 1, 19, 10, tzinfo=timezone.utc), datetime(2026, 3, 2, 1, 40, tzinfo=timezone.utc)])
def test_a_stopped_users_last_window_is_decided_by_later_ticks_without_new_data(tick_at):
    """w stops at 01:17:30, inside a 5-min window: a tick after 01:19 reduces w's last
    minute; the window ending 01:20 is then decided by later calls although w sends nothing."""
    s = SETTINGS["5-min windows every minute"]
    d = Detector(s)
    w, others = LIVE.filter(pl.col("user") == "w"), LIVE.filter(pl.col("user") != "w")
    outs = [d.update(w), d.update(others.filter(pl.col("time") < tick_at))]
    outs.append(d.advance(int(tick_at.timestamp() * 1e9), grace_s=60))
    outs.append(d.update(others.filter(pl.col("time") >= tick_at)))
    outs.append(d.flush())
    got = pl.concat([o.windows for o in outs]).sort("user", "window_start")
    assert got.filter(pl.col("user") == "w")["window_end"].max() == datetime(2026, 3, 2, 1, 20, tzinfo=timezone.utc)
    assert got.equals(LIVE_BATCH["5-min windows every minute"][0])


def test_mixed_sources_hr_only_windows_and_exercise_suppression():
    w = MIX_WINDOWS.filter(pl.col("user") == "w")
    assert set(w["signal"]) == {"hr_only"}
    assert w["rmssd_ms"].null_count() == w.height and w["hr_mean"].null_count() == 0
    # steps >= 60/min from 50 to 65 min: suppressed, and so is the recovery after it
    moving = w.filter(pl.col("steps") >= 60 * SMALL.window_s / 60)
    assert moving.height > 0 and set(moving["state"]) == {"suppressed_motion"}
    assert not any(a.user == "w" for a in MIX_ALERTS)
    # artefacts injected into user b's beats are removed and counted
    assert MIX_WINDOWS.filter(pl.col("user") == "b")["n_rr_removed"].sum() > 0


def test_advance_finishes_windows_like_flush():
    d = Detector(SMALL)
    first = d.update(SYN)
    end_ns = int(SYN["time"].max().timestamp() * 1e9)  # user b's last beat, in the window ending 02:00
    early = d.advance(end_ns, grace_s=60)  # only a's last window (ended 01:58) is over by grace_s
    assert early.windows.select("user", pl.col("window_end").dt.strftime("%H:%M")).rows() == [("a", "01:58")]
    ticked = d.advance(end_ns + 10 * 60 * 1_000_000_000, grace_s=60)
    assert set(ticked.windows["user"]) == {"b"}
    got = pl.concat([first.windows, early.windows, ticked.windows]).sort("user", "window_start")
    assert got.equals(BATCH_WINDOWS)


def test_state_per_user_is_bounded_whatever_the_history():
    d = Detector()
    assert 3000 < d.state_bytes_per_user() <= 4096  # counted from the layout, even before any user
    d.update(SYN)
    before = len(d.to_bytes())
    d.flush()
    assert d.state_bytes_per_user() <= 4096
    assert d.baselines.hr.shape[1:] == (d.settings.baseline_slots, d.settings.baseline_windows)
    assert before > 0


@pytest.mark.parametrize("cut", [2000, 9000])
def test_forget_removes_one_user_and_leaves_the_others_identical(cut):
    d = Detector(SMALL)
    first = d.update(MIX[:cut])
    d = d.forget("a")
    assert "a" not in d.users
    rest = MIX[cut:].filter(pl.col("user") != "a")
    second = d.update(rest)
    last = d.flush()
    got = pl.concat([first.windows, second.windows, last.windows]).filter(pl.col("user") != "a").sort("user", "window_start")
    assert got.equals(MIX_WINDOWS.filter(pl.col("user") != "a"))
    # a new sample of the forgotten user starts from scratch (calibrating), not from old state
    again = d.update(MIX.filter(pl.col("user") == "a")[:500]).windows
    assert set(again["state"]) <= {"calibrating", "insufficient_data"}


def test_state_survives_generic_per_user_row_deletion():
    """Erasure code outside the detector may drop user i from every array whose first axis is
    the user index (the engine's forget_user does): the result must be a valid detector."""
    import io as _io

    d = Detector(SMALL)
    d.update(MIX[:5000])
    z = dict(np.load(_io.BytesIO(d.to_bytes()), allow_pickle=False))
    i = z["users"].tolist().index("b")
    n = len(z["users"])
    for k, arr in z.items():
        if arr.ndim >= 1 and arr.shape[0] == n and k != "late":
            z[k] = np.delete(arr, i, axis=0)
    buf = _io.BytesIO()
    np.savez(buf, **z)
    restored = Detector.from_bytes(buf.getvalue(), SMALL)
    assert restored.users == [u for u in d.users if u != "b"]
    out = restored.update(MIX[5000:].filter(pl.col("user") != "b"))
    tail = restored.flush()
    got = pl.concat([out.windows, tail.windows])
    assert "b" not in set(got["user"]) and got.height > 0


def test_state_from_an_incompatible_version_is_a_clear_storage_error():
    import io as _io

    from stresswatch.errors import StorageError

    z = dict(np.load(_io.BytesIO(Detector(SMALL).to_bytes()), allow_pickle=False))
    z.pop("format")
    buf = _io.BytesIO()
    np.savez(buf, **z)
    with pytest.raises(StorageError, match="incompatible version"):
        Detector.from_bytes(buf.getvalue(), SMALL)
