"""The project's broker as `stresswatch broker config` writes it, run by a real Mosquitto.

Isolation is proven by delivery, never by a SUBACK: each test has the attacker try, waits
until the broker acknowledged the attempt (PUBACK/SUBACK), then sends a legitimate message
as a positive control on the same path and asserts that only the legitimate one arrives.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from stresswatch.alerts.transport import connect
from stresswatch.errors import TransportError

P = "stresswatch/v1"
ENGINE = "stresswatch-engine"


class Inbox:
    """A real client of one account that records every message delivered to it."""

    def __init__(self, url: str, account: str, password: str, topics: list[str], *, client_id: str | None = None, **kw):
        self.messages: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()
        self.client = connect(
            url, client_id or f"inbox-{account}-{time.monotonic_ns()}", username=account, password=password,
            timeout_s=5, on_message=self._on_message, **kw,
        )
        if topics:
            done = threading.Event()
            self.client.on_subscribe = lambda *a: done.set()
            self.client.subscribe([(t, 1) for t in topics])
            assert done.wait(5), "no SUBACK"

    def _on_message(self, client, userdata, msg) -> None:
        with self._cv:
            self.messages.append((msg.topic, msg.payload))
            self._cv.notify_all()

    def wait_for(self, payload: bytes, timeout_s: float = 5.0) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: any(p == payload for _, p in self.messages), timeout_s), (
                f"{payload!r} never arrived; got {self.messages}"
            )

    def payloads(self) -> list[bytes]:
        with self._cv:
            return [p for _, p in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker, account: str, items: list[tuple[str, bytes]], *, retain: bool = False) -> None:
    """Publish as ``account`` at QoS 1, one connection per message, and wait until the broker
    acknowledged it: after a PUBACK mosquitto has already routed (or refused) the message.

    Mosquitto 2.0.11 now and then drops the connection right after refusing a publish
    (PUBACK 0x87; measured 3 in 60 here); then paho cannot report the PUBACK and the message
    is sent again on a new connection (a refused message may so be tried twice: harmless).
    """
    for topic, payload in items:
        for attempt in range(3):
            c = connect(broker.url, f"pub-{account}-{time.monotonic_ns()}", username=account, password=broker.passwords[account], timeout_s=5)
            try:
                c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
            finally:
                c.disconnect()
                c.loop_stop()


# -- authentication ---------------------------------------------------------------------------


def test_no_credentials_wrong_password_and_unknown_account_are_refused(secure_broker):
    url = secure_broker.url
    with pytest.raises(TransportError, match="refused"):
        connect(url, "anon", timeout_s=5)
    with pytest.raises(TransportError, match="refused"):
        connect(url, "guess", username="sam", password="not-sams-password", timeout_s=5)
    with pytest.raises(TransportError, match="refused"):
        connect(url, "nobody", username="mallory", password="x", timeout_s=5)
    # the password `broker add-worker` hashed in Python is accepted by mosquitto itself
    ok = connect(url, "sam-ok", username="sam", password=secure_broker.passwords["sam"], timeout_s=5)
    assert ok.is_connected()
    ok.disconnect()


def test_an_account_added_to_a_running_broker_works_after_sighup_and_a_removed_one_is_refused(secure_broker):
    from stresswatch.cli import main

    b = secure_broker
    b.add("worker", "lee")
    b.reload()
    lee = Inbox(b.url, "lee", b.passwords["lee"], [f"{P}/alerts/lee"])
    try:
        publish(b, ENGINE, [(f"{P}/alerts/lee", b"before-removal")])
        lee.wait_for(b"before-removal")
        assert main(["broker", "remove", "lee", "--dir", str(b.dir)]) == 0
        b.reload()
        publish(b, ENGINE, [(f"{P}/alerts/lee", b"after-removal")])
        time.sleep(0.5)
        assert lee.payloads() == [b"before-removal"]  # the open connection is cut off too
    finally:
        lee.close()
    with pytest.raises(TransportError, match="refused"):
        connect(b.url, "lee2", username="lee", password=b.passwords["lee"], timeout_s=5)


# -- isolation, proven by delivery --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["alerts", "replies"])
def test_worker_never_receives_another_workers_alerts(secure_broker, kind):
    b = secure_broker
    # kim tries every way to see sam's alerts (or the engine's replies to sam); sam listens on its own topic
    kim = Inbox(b.url, "kim", b.passwords["kim"], [f"{P}/{kind}/sam", f"{P}/{kind}/+", f"{P}/#", "#", f"{P}/{kind}/kim"])
    sam = Inbox(b.url, "sam", b.passwords["sam"], [f"{P}/{kind}/sam"])
    try:
        publish(b, ENGINE, [(f"{P}/{kind}/sam", f"for-sam-{i}".encode()) for i in range(5)])
        publish(b, ENGINE, [(f"{P}/{kind}/kim", b"for-kim")])
        kim.wait_for(b"for-kim")  # kim's subscriptions deliver: its own alert arrived
        sam.wait_for(b"for-sam-4")
        time.sleep(0.3)
        assert set(kim.payloads()) == {b"for-kim"}  # one copy per overlapping subscription
        assert sam.payloads() == [f"for-sam-{i}".encode() for i in range(5)]
    finally:
        kim.close()
        sam.close()


def test_user_cannot_publish_to_another_users_ingest_consent_or_checkin(secure_broker):
    b = secure_broker
    engine = Inbox(b.url, ENGINE, b.passwords[ENGINE], [f"{P}/ingest/+", f"{P}/consent/+", f"{P}/checkin/+"])
    try:
        publish(b, "alice", [(f"{P}/ingest/bob", b"forged-samples"), (f"{P}/consent/bob", b"forged-consent"), (f"{P}/checkin/bob", b"forged-checkin")])
        publish(b, "sam", [(f"{P}/ingest/sam", b"worker-as-user"), (f"{P}/consent/sam", b"worker-consent"), (f"{P}/checkin/sam", b"worker-checkin")])
        publish(b, "alice", [(f"{P}/ingest/alice", b"alice-samples"), (f"{P}/checkin/alice", b"alice-asks")])
        engine.wait_for(b"alice-asks")
        time.sleep(0.3)
        assert engine.payloads() == [b"alice-samples", b"alice-asks"]
    finally:
        engine.close()
    # nor can a forged consent sit retained on bob's topic for the engine's next start
    publish(b, "alice", [(f"{P}/consent/bob", b"forged-retained")], retain=True)
    publish(b, "alice", [(f"{P}/consent/alice", b"alice-consent")], retain=True)
    later = Inbox(b.url, ENGINE, b.passwords[ENGINE], [f"{P}/consent/+"])
    try:
        later.wait_for(b"alice-consent")
        time.sleep(0.3)
        assert later.payloads() == [b"alice-consent"]
    finally:
        later.close()


@pytest.mark.parametrize("kind", ["alerts", "replies"])
def test_forged_alerts_from_a_user_or_a_worker_never_reach_a_worker(secure_broker, kind):
    b = secure_broker
    sam = Inbox(b.url, "sam", b.passwords["sam"], [f"{P}/{kind}/sam"])
    try:
        publish(b, "alice", [(f"{P}/{kind}/sam", b'{"alert_id": "forged-by-user"}')])
        publish(b, "kim", [(f"{P}/{kind}/sam", b'{"alert_id": "forged-by-worker"}')])
        publish(b, "sam", [(f"{P}/{kind}/sam", b'{"alert_id": "forged-by-sam-itself"}')])
        publish(b, ENGINE, [(f"{P}/{kind}/sam", b'{"alert_id": "genuine"}')])
        sam.wait_for(b'{"alert_id": "genuine"}')
        time.sleep(0.3)
        assert sam.payloads() == [b'{"alert_id": "genuine"}']
    finally:
        sam.close()


def test_only_the_engines_status_reaches_a_user(secure_broker):
    b = secure_broker
    bob = Inbox(b.url, "bob", b.passwords["bob"], [f"{P}/status/bob", f"{P}/engine/status"])
    try:
        publish(b, "alice", [(f"{P}/status/bob", b"forged-by-user"), (f"{P}/engine/status", b"forged-offline")])
        publish(b, "bob", [(f"{P}/status/bob", b"forged-by-himself")])
        publish(b, "sam", [(f"{P}/status/bob", b"forged-by-worker"), (f"{P}/engine/status", b"forged-by-worker")])
        publish(b, ENGINE, [(f"{P}/status/bob", b"paused"), (f"{P}/engine/status", b"online")])
        bob.wait_for(b"online")
        time.sleep(0.3)
        assert sorted(bob.payloads()) == [b"online", b"paused"]
    finally:
        bob.close()


def test_roles_do_not_leak_through_the_id_patterns(secure_broker):
    """%u patterns apply to every account: the per-account deny lines keep a user from
    reading alerts on a topic named after it and a worker from reading a status."""
    b = secure_broker
    alice = Inbox(b.url, "alice", b.passwords["alice"], [f"{P}/alerts/alice", f"{P}/replies/alice", f"{P}/status/alice", f"{P}/status/bob"])
    sam = Inbox(b.url, "sam", b.passwords["sam"], [f"{P}/status/sam", f"{P}/engine/status"])
    try:
        publish(b, ENGINE, [(f"{P}/alerts/alice", b"alert-on-alice-topic"), (f"{P}/replies/alice", b"reply-on-alice-topic")])
        publish(b, ENGINE, [(f"{P}/status/sam", b"status-sam")])
        publish(b, ENGINE, [(f"{P}/status/bob", b"status-bob"), (f"{P}/status/alice", b"status-alice")])
        publish(b, ENGINE, [(f"{P}/engine/status", b"online")])
        alice.wait_for(b"status-alice")
        sam.wait_for(b"online")  # every account reads the engine's status
        time.sleep(0.3)
        assert alice.payloads() == [b"status-alice"]
        assert sam.payloads() == [b"online"]
    finally:
        alice.close()
        sam.close()


def test_a_client_id_thief_gets_no_alerts_and_a_private_client_id_keeps_the_workers_queue(secure_broker):
    """Mosquitto lets any account take over a session by its client id. The ACL still keeps
    the alerts from the intruder; a client id derived from the password keeps the session."""
    from stresswatch.alerts.worker import WorkerClient
    from stresswatch.broker import private_client_id

    b = secure_broker
    public_cid = "stresswatch-worker-sam"
    sam = Inbox(b.url, "sam", b.passwords["sam"], [f"{P}/alerts/sam"], client_id=public_cid, persistent_session=True)
    sam.close()  # offline: alerts queue in its session
    publish(b, ENGINE, [(f"{P}/alerts/sam", b"queued-for-sam")])
    thief = Inbox(b.url, "alice", b.passwords["alice"], [], client_id=public_cid, persistent_session=True)
    time.sleep(1.0)
    thief.close()
    assert thief.payloads() == []

    cid = private_client_id(public_cid, b.passwords["sam"])
    assert cid != public_cid and b.passwords["sam"] not in cid
    seen = []
    worker = WorkerClient(b.url, "sam", seen.append, username="sam", password=b.passwords["sam"], client_id=cid)
    worker.close()
    alert = _alert("a-while-sam-was-away")
    publish(b, ENGINE, [(f"{P}/alerts/sam", alert)])
    for guess in (public_cid, "stresswatch-worker-sam-ack", "sam"):  # the ids a thief can guess
        Inbox(b.url, "alice", b.passwords["alice"], [], client_id=guess, persistent_session=True).close()
    back = WorkerClient(b.url, "sam", seen.append, username="sam", password=b.passwords["sam"], client_id=cid)
    try:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a.alert_id for a in seen] == ["a-while-sam-was-away"]
    finally:
        back.close()


def _alert(alert_id: str) -> bytes:
    from datetime import datetime, timezone

    from stresswatch.model import Alert

    now = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
    return Alert(alert_id=alert_id, user="p-1", raised_at=now, episode_start=now).model_dump_json().encode()


def test_generated_persistence_keeps_queued_alerts_across_sigkill(secure_broker):
    b = secure_broker
    cid = "stresswatch-worker-sam"
    sam = Inbox(b.url, "sam", b.passwords["sam"], [f"{P}/alerts/sam"], client_id=cid, persistent_session=True)
    sam.close()
    publish(b, ENGINE, [(f"{P}/alerts/sam", f"a{i}".encode()) for i in range(20)])
    time.sleep(1.5)  # autosave_interval 1 with autosave_on_changes
    b.process.kill()
    b.process.start()
    back = Inbox(b.url, "sam", b.passwords["sam"], [], client_id=cid, persistent_session=True)
    try:
        back.wait_for(b"a19")
        assert back.payloads() == [f"a{i}".encode() for i in range(20)]
    finally:
        back.close()


# -- TLS with a throwaway CA ---------------------------------------------------------------------

OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    if OPENSSL is None:
        pytest.fail("the TLS tests make a throwaway CA with the openssl command; install openssl")
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def throwaway_pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(d, "stresswatch-test-ca")
    wrong_ca, _ = _make_ca(d, "some-other-ca")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d,
    )
    return {"ca": ca, "wrong_ca": wrong_ca, "cert": d / "server.crt", "key": d / "server.key"}


@pytest.fixture
def tls_broker(make_secure_broker, throwaway_pki):
    pki = throwaway_pki
    return make_secure_broker("--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]), "--tls-ca", str(pki["ca"]), plaintext=False)


def test_tls_right_ca_works_and_still_requires_a_password(tls_broker, throwaway_pki):
    b = tls_broker
    url = b.tls_url(throwaway_pki["ca"])
    sam = Inbox(url, "sam", b.passwords["sam"], [f"{P}/alerts/sam"])
    try:
        eng = connect(url, "engine-tls", username=ENGINE, password=b.passwords[ENGINE], timeout_s=5)
        eng.publish(f"{P}/alerts/sam", b"over-tls", qos=1).wait_for_publish(5)
        eng.disconnect()
        sam.wait_for(b"over-tls")
    finally:
        sam.close()
    with pytest.raises(TransportError, match="refused"):
        connect(url, "anon-tls", timeout_s=5)


def test_tls_wrong_ca_fails(tls_broker, throwaway_pki):
    b = tls_broker
    with pytest.raises(TransportError, match="certificate verify failed"):
        connect(b.tls_url(throwaway_pki["wrong_ca"]), "wrong-ca", username="sam", password=b.passwords["sam"], timeout_s=5)


def test_tls_system_cas_do_not_trust_the_throwaway_ca(tls_broker):
    b = tls_broker
    with pytest.raises(TransportError, match="certificate verify failed"):
        connect(f"mqtts://127.0.0.1:{b.tls_port}", "system-ca", username="sam", password=b.passwords["sam"], timeout_s=5)


def test_plaintext_to_the_tls_port_fails(tls_broker):
    b = tls_broker
    with pytest.raises(TransportError, match="no CONNACK"):  # mosquitto drops the non-TLS bytes
        connect(f"mqtt://127.0.0.1:{b.tls_port}", "plain", username="sam", password=b.passwords["sam"], timeout_s=3)


def test_the_live_check_refuses_a_broker_that_lets_anonymous_clients_in(mosquitto, secure_broker):
    from stresswatch.broker import check_broker_refuses_anonymous
    from stresswatch.errors import ConfigError

    with pytest.raises(ConfigError, match="accepts clients without a password"):
        check_broker_refuses_anonymous(mosquitto.url, off_loopback_only=False)  # the anonymous test broker
    check_broker_refuses_anonymous(secure_broker.url, off_loopback_only=False)  # the generated one
    check_broker_refuses_anonymous(mosquitto.url)  # loopback: not probed (the demo's case)


def test_a_refused_publish_is_an_error_for_the_publisher_not_a_silent_success(secure_broker):
    """A companion logged in as the wrong account must not believe its consent was sent:
    the broker's MQTT 5 refusal (PUBACK 0x87) surfaces as TransportError on flush."""
    from stresswatch.alerts.transport import MqttTransport

    b = secure_broker
    for attempt in range(3):  # mosquitto 2.0.11 sometimes drops the link after a refusal (see publish())
        t = MqttTransport(b.url, client_id=f"alice-companion-{time.monotonic_ns()}", username="alice", password=b.passwords["alice"], protocol="5")
        try:
            t.publish(f"{P}/consent/alice", b"{}", retain=True)
            t.flush(5)  # her own topic: accepted
            t.publish(f"{P}/consent/bob", b"forged")
            with pytest.raises(TransportError, match="refused 1 publish.*consent/bob"):
                t.flush(5)
            break
        except TransportError as exc:
            if "did not acknowledge" not in str(exc) or attempt == 2:
                raise
        finally:
            t._client.disconnect()
            t._client.loop_stop()
