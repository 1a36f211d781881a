"""The one MQTT client factory (stresswatch.mqtt) as each caller uses it, against a real
Mosquitto running the generated configuration (accounts, ACL, optional TLS with a throwaway CA)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stresswatch.broker import EmbeddedBroker
from stresswatch.mqtt import NotAuthorised, connect
from stresswatch_adapters.ble_hrs.buffer import StreamBuffer
from stresswatch_adapters.ble_hrs.stream import DurablePublisher
from test_broker_security import ENGINE, P, Inbox, throwaway_pki, tls_broker  # noqa: F401 - fixtures

pytestmark = pytest.mark.mosquitto


def _buffer_with(tmp_path: Path, user: str, n: int) -> StreamBuffer:
    box = StreamBuffer(tmp_path / f"{user}.sqlite")
    for seq in range(n):
        box.add("s1", seq, f"{P}/ingest/{user}", f"batch-{seq}".encode(), 1)
    return box


def test_the_companion_trusts_the_private_ca_named_in_the_url(tls_broker, throwaway_pki, tmp_path):
    """`stream --broker mqtts://...?cafile=ca.pem`: before the factory, the companion called
    tls_set() without the CA and could not connect to a broker with a private CA."""
    b = tls_broker
    url = b.tls_url(throwaway_pki["ca"])
    engine = Inbox(url, ENGINE, b.passwords[ENGINE], [f"{P}/ingest/+"])
    box = _buffer_with(tmp_path, "alice", 3)
    pub = DurablePublisher(url, box, username="alice", password=b.passwords["alice"], reconnect_max_s=1)
    try:
        assert pub.drain(20.0) is True
        for seq in range(3):
            engine.wait_for(f"batch-{seq}".encode())
        assert box.count() == 0
    finally:
        pub.close()
        engine.close()
        box.close()


def test_a_wrong_password_says_not_authorised_and_how_to_pass_credentials(tls_broker, throwaway_pki, tmp_path):
    url = tls_broker.tls_url(throwaway_pki["ca"])
    with pytest.raises(NotAuthorised, match="not authorised: the broker refused the account 'sam'") as err:
        connect(url, "sam-guessing", username="sam", password="not-sams-password", timeout_s=5)
    assert "mqtt://USER:PASSWORD@HOST" in str(err.value) and "STRESSWATCH_MQTT__PASSWORD_FILE" in str(err.value)
    assert "not-sams-password" not in str(err.value)
    with pytest.raises(NotAuthorised, match="a client without an account"):
        connect(url, "anonymous", timeout_s=5)
    # the companion stops retrying at once: a wrong password does not get better with time
    box = _buffer_with(tmp_path, "alice", 1)
    pub = DurablePublisher(url, box, username="alice", password="wrong", reconnect_max_s=1)
    try:
        started = time.monotonic()
        with pytest.raises(NotAuthorised):
            pub.drain(20.0)
        assert time.monotonic() - started < 10
        assert box.count() == 1  # nothing lost
    finally:
        pub.close()
        box.close()


def test_auto_falls_back_to_mqtt_311_for_the_embedded_broker_in_the_companion_too(tmp_path):
    with EmbeddedBroker() as broker:
        box = _buffer_with(tmp_path, "alice", 2)
        pub = DurablePublisher(broker.url, box, reconnect_max_s=1)
        try:
            assert pub.drain(20.0) is True
            assert box.count() == 0
        finally:
            pub.close()
            box.close()


def _watch(url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`stresswatch alerts watch` for sam for one second: connects, subscribes, exits."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STRESSWATCH_")}
    full_env.update(STRESSWATCH_STORE__STATE_DIR=str(tmp_path / "state"), **env)
    return subprocess.run(
        [sys.executable, "-m", "stresswatch.cli", "alerts", "watch", "--worker", "sam", "--broker", url, "--timeout-s", "1"],
        env=full_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_credentials_from_the_url_the_environment_or_a_password_file(secure_broker, tmp_path):
    b = secure_broker
    port = b.url.rsplit(":", 1)[1]
    pw = b.passwords["sam"]
    in_url = _watch(f"mqtt://sam:{pw}@127.0.0.1:{port}", tmp_path)
    assert in_url.returncode == 0, in_url.stderr
    from_env = _watch(b.url, tmp_path, STRESSWATCH_MQTT__USERNAME="sam", STRESSWATCH_MQTT__PASSWORD=pw)
    assert from_env.returncode == 0, from_env.stderr
    secret = tmp_path / "sam.password"
    secret.write_text(pw + "\n")
    secret.chmod(0o600)
    from_file = _watch(b.url, tmp_path, STRESSWATCH_MQTT__USERNAME="sam", STRESSWATCH_MQTT__PASSWORD_FILE=str(secret))
    assert from_file.returncode == 0, from_file.stderr
    for run in (in_url, from_env, from_file):
        assert "watching alerts for sam" in run.stderr


def test_a_refused_account_is_one_clear_line_and_a_non_zero_exit(secure_broker, tmp_path):
    wrong = _watch(secure_broker.url, tmp_path, STRESSWATCH_MQTT__USERNAME="sam", STRESSWATCH_MQTT__PASSWORD="nope")
    assert wrong.returncode == NotAuthorised.exit_code
    assert "Traceback" not in wrong.stderr
    assert "not authorised" in wrong.stderr and "nope" not in wrong.stderr
    missing = _watch(secure_broker.url, tmp_path, STRESSWATCH_MQTT__USERNAME="sam", STRESSWATCH_MQTT__PASSWORD_FILE=str(tmp_path / "absent"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "password file" in missing.stderr and "absent" in missing.stderr

