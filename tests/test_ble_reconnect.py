"""The pure reconnection state machine: enrolled device only, capped backoff, one subscription
per connection, gaps recorded."""

from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch_adapters.ble_hrs import reconnect as rc

ENROLLED = "AA:BB:CC:DD:EE:01"
POLICY = rc.BackoffPolicy(base_s=1.0, cap_s=8.0, scan_timeout_s=5.0)


def run(events, state=None, t0=0.0):
    state = state or rc.LinkState(ENROLLED)
    all_actions = []
    for i, (t, ev) in enumerate(events):
        state, actions = rc.step(state, ev, t0 + t, POLICY)
        all_actions.append(actions)
    return state, all_actions


def streaming(t=0.0):
    state, _ = run([(t, rc.Start()), (t, rc.DeviceFound(ENROLLED)), (t, rc.Connected(1)), (t, rc.Subscribed(1))])
    return state


def test_connects_only_to_the_enrolled_device():
    state, actions = run([(0, rc.Start()), (1, rc.DeviceFound("11:22:33:44:55:66")), (2, rc.DeviceFound(ENROLLED.lower()))])
    assert actions[1] == []
    assert rc.Connect(ENROLLED, 1) in actions[2]
    assert state.phase is rc.Phase.CONNECTING


def test_backoff_is_capped_exponential_and_resets_after_streaming():
    state, _ = run([(0, rc.Start())])
    delays = []
    now = 0.0
    for _ in range(6):
        state, actions = rc.step(state, rc.ScanTimeout(), now, POLICY)
        (tick,) = [a for a in actions if isinstance(a, rc.ScheduleTick)]
        delays.append(tick.at_s - now)
        now = tick.at_s
        state, _ = rc.step(state, rc.Tick(), now, POLICY)
        assert state.phase is rc.Phase.SCANNING
    assert delays == [1, 2, 4, 8, 8, 8]
    state, _ = run([(now, rc.DeviceFound(ENROLLED)), (now, rc.Connected(1)), (now, rc.Subscribed(1))], state)
    state, actions = rc.step(state, rc.Disconnected(1), now + 5, POLICY)
    assert [a.at_s for a in actions if isinstance(a, rc.ScheduleTick)] == [now + 6]


def test_tick_before_due_does_nothing():
    state, _ = run([(0, rc.Start()), (0, rc.ScanTimeout())])
    assert rc.step(state, rc.Tick(), 0.5, POLICY) == (state, [])


def test_disconnect_records_a_gap_from_last_notification_to_resumption():
    state = streaming()
    state, _ = rc.step(state, rc.NotificationSeen(1), 10.0, POLICY)
    state, actions = rc.step(state, rc.Disconnected(1), 10.7, POLICY)
    assert rc.ResetBeatClock() in actions and state.phase is rc.Phase.BACKOFF
    state, _ = run([(11.7, rc.Tick()), (12, rc.DeviceFound(ENROLLED)), (12.5, rc.Connected(2))], state)
    state, actions = rc.step(state, rc.Subscribed(2), 13.0, POLICY)
    assert actions == [rc.RecordGap(10.0, 13.0)]
    assert state.phase is rc.Phase.STREAMING and state.gap_start_s is None


def test_late_events_of_an_old_connection_are_ignored():
    state = streaming()
    state, _ = run([(1, rc.Disconnected(1)), (2, rc.Tick()), (2, rc.DeviceFound(ENROLLED)), (2, rc.Connected(2)), (2, rc.Subscribed(2))], state)
    assert state.epoch == 2
    for late in (rc.Disconnected(1), rc.NotificationSeen(1), rc.Subscribed(1), rc.Connected(1)):
        assert rc.step(state, late, 3, POLICY) == (state, [])


def test_stop_disconnects_and_nothing_happens_after():
    state = streaming()
    state, actions = rc.step(state, rc.Stop(), 1, POLICY)
    assert actions == [rc.Disconnect(1)] and state.phase is rc.Phase.STOPPED
    assert rc.step(state, rc.Start(), 2, POLICY) == (state, [])


EVENTS = st.one_of(
    st.just(rc.Start()),
    st.sampled_from([rc.DeviceFound(ENROLLED), rc.DeviceFound("66:55:44:33:22:11")]),
    st.just(rc.ScanTimeout()),
    st.builds(rc.Connected, st.integers(0, 4)),
    st.builds(rc.ConnectFailed, st.integers(0, 4)),
    st.builds(rc.Subscribed, st.integers(0, 4)),
    st.builds(rc.NotificationSeen, st.integers(0, 4)),
    st.builds(rc.Disconnected, st.integers(0, 4)),
    st.just(rc.Tick()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), EVENTS), max_size=60))
def test_invariants_under_any_event_sequence(timed_events):
    state = rc.LinkState(ENROLLED)
    subscribed_epochs = []
    now = 0.0
    for dt, ev in timed_events:
        now += dt
        state, actions = rc.step(state, ev, now, POLICY)
        for a in actions:
            if isinstance(a, rc.Connect):
                assert a.address == ENROLLED  # never another device
            if isinstance(a, rc.Subscribe):
                subscribed_epochs.append(a.epoch)
            if isinstance(a, rc.ScheduleTick):
                assert 0 < a.at_s - now <= POLICY.cap_s
            if isinstance(a, rc.RecordGap):
                assert a.start_s <= a.end_s
    assert len(subscribed_epochs) == len(set(subscribed_epochs))  # one handler per connection
