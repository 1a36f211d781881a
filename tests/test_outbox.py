"""The durable outbox with the consent gate at publish time (real SQLite files, in-memory
transport): withdrawal races and at-least-once delivery across a restart."""

import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from stresswatch.alerts.dispatch import Dispatcher
from stresswatch.alerts.lifecycle import AlertState, EscalationPolicy
from stresswatch.alerts.outbox import Outbox
from stresswatch.alerts.transport import MemoryTransport
from stresswatch.consent import ConsentLedger, Status
from stresswatch.errors import ConsentError
from stresswatch.model import AlertDecision, AlertLevel, Reason, alert_id_for

T0 = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)


class Clock:
    def __init__(self, t: datetime = T0) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def tick(self, s: float = 1.0) -> None:
        self.t += timedelta(seconds=s)


def decision(k: int, user: str = "alice") -> AlertDecision:
    start = T0 + timedelta(minutes=10 * k)
    return AlertDecision(alert_id_for(user, start), user, start + timedelta(minutes=5), start, AlertLevel.ELEVATED, (Reason.HRV_BELOW_BASELINE,), 3.0)


class NeverAcked:
    """A broker that took the message but never sent PUBACK (it died)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, *, qos=1, retain=False, expiry_s=None):
        self.messages.append((topic, payload))

        class R:
            def is_published(self) -> bool:
                return False

        return R()

    def flush(self, timeout_s=10.0): ...

    def close(self): ...


def make(tmp: Path, transport, clock, **policy) -> tuple[ConsentLedger, Outbox, Dispatcher]:
    ledger = ConsentLedger(tmp / "s.sqlite")
    outbox = Outbox(tmp / "s.sqlite")
    pol = EscalationPolicy(**{"cooldown_s": 0, "escalate_after_s": 10_000, "renotify_after_s": 10_000, **policy})
    return ledger, outbox, Dispatcher(outbox, ledger, transport, clock=clock, policy=pol, resend_after_s=5.0, monotonic=lambda: clock().timestamp())


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("raise"), st.integers(0, 5)),
        st.just(("pump",)),
        st.just(("revoke",)),
        st.just(("grant",)),
        st.just(("pause",)),
        st.just(("resume",)),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_no_alert_is_published_after_a_withdrawal_is_recorded(ops):
    """Over any interleaving of raised alerts, publishing, revocations, re-grants and pauses:
    nothing is published while consent is not active, and no alert queued before the last
    revocation is ever published (not even after a new grant)."""
    with tempfile.TemporaryDirectory() as d:
        clock = Clock()
        transport = MemoryTransport()
        ledger, outbox, disp = make(Path(d), transport, clock)
        ledger.grant("alice", ["sam"], now=clock())
        queued_at: dict[str, datetime] = {}
        for op in ops:
            clock.tick()
            before = len(transport.messages)
            state = ledger.state("alice")
            if op[0] == "raise":
                rec = disp.raise_alert(decision(op[1]), publish=False)
                queued_at.setdefault(rec.alert_id, clock())
            elif op[0] == "pump":
                disp.pump()
            else:
                try:
                    getattr(ledger, op[0])(*(("alice", ["sam"]) if op[0] == "grant" else ("alice",)), now=clock())
                except ConsentError:
                    pass  # a change that changes nothing is refused and recorded nowhere
            new = transport.messages[before:]
            if new:
                assert op[0] == "pump"
                assert state.status is Status.ACTIVE
                for m in new:
                    alert_id = json.loads(m.payload)["alert_id"]
                    assert state.withdrawn_at is None or queued_at[alert_id] > state.withdrawn_at
        # whatever was waiting when consent was withdrawn ends withheld, never delivered later
        disp.pump()
        final = ledger.state("alice")
        for rec in outbox.records():
            if final.withdrawn_at and rec.queued_at and rec.queued_at <= final.withdrawn_at and rec.state is AlertState.RAISED:
                assert False, "an alert raised before the revocation is still waiting to be sent"
        ledger.close()
        outbox.close()


def test_restart_resends_undelivered_with_the_same_id(tmp_path):
    clock = Clock()
    dead = NeverAcked()
    ledger, outbox, disp = make(tmp_path, dead, clock)
    ledger.grant("alice", ["sam", "kim"], now=clock())
    disp.groups = {}
    ids = [disp.raise_alert(decision(k)).alert_id for k in range(3)]
    assert len(dead.messages) == 3 and outbox.delivery_counts()["pending"] == 3
    ledger.close()
    outbox.close()
    # the engine process dies; a new one opens the same file and publishes what is pending
    live = MemoryTransport()
    ledger, outbox, disp = make(tmp_path, live, clock)
    assert disp.pump() == 3
    assert [json.loads(m.payload)["alert_id"] for m in live.messages] == ids
    assert {m.topic for m in live.messages} == {"stresswatch/v1/alerts/sam"}
    assert outbox.delivery_counts() == {"total": 3, "delivered": 3, "dropped": 0, "pending": 0}
    assert all(outbox.get(i).state is AlertState.DELIVERED for i in ids)
    assert disp.pump() == 0  # delivered once acknowledged: not sent again
    # re-raising the same episode (detector restored from an older state) adds nothing
    disp.raise_alert(decision(0))
    assert len(live.messages) == 3


def test_unacknowledged_publish_is_repeated_after_resend_interval(tmp_path):
    clock = Clock()
    dead = NeverAcked()
    ledger, outbox, disp = make(tmp_path, dead, clock)
    ledger.grant("alice", ["sam"], now=clock())
    disp.raise_alert(decision(0))
    clock.tick(4)
    disp.pump()
    assert len(dead.messages) == 1
    clock.tick(2)  # past resend_after_s = 5
    disp.pump()
    assert len(dead.messages) == 2 and dead.messages[0] == dead.messages[1]  # same bytes, same id


def test_connection_loss_republishes_what_the_broker_acknowledged_just_before(tmp_path):
    """A broker killed right after its PUBACK may not have saved the message: deliveries
    acknowledged within the window before the loss go out again, same id; older ones do not."""
    clock = Clock()
    t = MemoryTransport()
    ledger, outbox, disp = make(tmp_path, t, clock)
    ledger.grant("alice", ["sam"], now=clock())
    old = disp.raise_alert(decision(0)).alert_id
    disp.pump()
    clock.tick(60)
    recent = disp.raise_alert(decision(1)).alert_id
    disp.pump()
    clock.tick(2)
    assert outbox.delivery_counts()["pending"] == 0
    assert disp.connection_lost() == 1
    assert disp.pump() == 1
    assert json.loads(t.messages[-1].payload)["alert_id"] == recent != old
    assert outbox.delivery_counts() == {"total": 2, "delivered": 2, "dropped": 0, "pending": 0}


def test_revocation_after_delivery_is_recorded_as_stopped_not_as_withheld(tmp_path):
    """The audit trail says what really happened (#11): a notice the broker already acknowledged
    reached (or is queued for) the worker, so a later revocation stops further notices and is
    recorded as such, naming who had it, never as 'withheld'."""
    clock = Clock()
    t = MemoryTransport()
    ledger, outbox, disp = make(tmp_path, t, clock, escalate_after_s=60)
    ledger.grant("alice", ["sam", "kim"], now=clock())
    disp.groups = {}
    aid = disp.raise_alert(decision(0)).alert_id
    disp.pump()
    assert outbox.get(aid).state is AlertState.DELIVERED
    clock.tick(5)
    ledger.revoke("alice", now=clock())
    clock.tick(120)  # past the escalation deadline: the next notice would go to kim
    disp.run_due()
    disp.pump()
    rec = outbox.get(aid)
    assert [m.topic for m in t.messages] == ["stresswatch/v1/alerts/sam"]  # escalation stopped
    assert rec.verdict == "stopped_revoked" and rec.targets == ("sam",)
    last = outbox.events("alice")[-1]
    assert last["kind"] == "stopped" and "delivered before to sam" in last["detail"]
    assert disp.stats.withheld == 0
    # an alert revoked before anything was published is still withheld
    clock.tick(5)
    ledger.grant("alice", ["sam"], now=clock())
    other = disp.raise_alert(decision(1), publish=False).alert_id
    ledger.revoke("alice", now=clock())
    disp.pump()
    assert outbox.get(other).verdict == "withheld_revoked"
    assert t.messages[-1].topic == "stresswatch/v1/alerts/sam" and len(t.messages) == 1
    ledger.close()
    outbox.close()
