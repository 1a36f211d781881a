"""`stresswatch broker config` and provisioning without a running broker: the files, the
password hashes, id rules, and the engine's security check. The broker itself accepting
all of it is tested in test_broker_security.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stresswatch.alerts.topics import Topics
from stresswatch.broker import (
    BrokerDir,
    Role,
    check_account_id,
    check_broker_security,
    hash_password,
    mosquitto_conf,
    parse_mosquitto_conf,
    private_client_id,
    render_acl,
    verify_password,
)
from stresswatch.errors import ConfigError


def sw(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], capture_output=True, text=True, timeout=60, input=input)


# -- provisioning through the CLI ---------------------------------------------------------------


def test_config_then_add_worker_prints_the_generated_password_once_and_stores_only_its_hash(tmp_path: Path):
    d = tmp_path / "broker"
    res = sw("broker", "config", "--out", str(d), "--port", "18830")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # nothing secret, nothing to parse
    for f in ("mosquitto.conf", "passwd", "acl", "accounts.json"):
        assert (d / f).is_file()
    assert (d / "data").is_dir()
    conf = (d / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 18830 127.0.0.1" in conf
    assert f"password_file {d.resolve()}/passwd" in conf and f"acl_file {d.resolve()}/acl" in conf
    assert "autosave_on_changes true" in conf and "max_queued_messages 0" in conf

    res = sw("broker", "add-worker", "sam", "--dir", str(d))
    assert res.returncode == 0, res.stderr
    password = res.stdout.strip()
    assert res.stdout == password + "\n" and len(password) >= 24
    (line,) = (d / "passwd").read_text().splitlines()
    user, encoded = line.split(":", 1)
    assert user == "sam" and encoded.startswith("$7$") and password not in encoded
    assert verify_password(password, encoded) and not verify_password(password + "x", encoded)
    assert (d / "passwd").stat().st_mode & 0o077 == 0  # not readable by others

    listed = sw("broker", "list", "--dir", str(d))
    assert listed.stdout.split() == ["worker", "sam"] and password not in listed.stdout


def test_an_id_names_one_account_and_replace_sets_a_new_password(tmp_path: Path):
    d = BrokerDir(tmp_path / "b")
    d.write_config()
    first = d.add(Role.WORKER, "sam")
    with pytest.raises(ConfigError, match="already provisioned as a worker"):
        d.add(Role.USER, "sam")  # a user and a worker cannot share an id
    with pytest.raises(ConfigError, match="--replace"):
        d.add(Role.WORKER, "sam")
    second = d.add(Role.WORKER, "sam", replace=True)
    assert second != first
    (line,) = d.passwd.read_text().splitlines()
    assert verify_password(second, line.split(":", 1)[1]) and not verify_password(first, line.split(":", 1)[1])


def test_password_file_option_and_rerunning_config_keeps_accounts(tmp_path: Path):
    d = tmp_path / "b"
    assert sw("broker", "config", "--out", str(d)).returncode == 0
    res = sw("broker", "add-user", "alice", "--dir", str(d), "--password-file", "-", input="correct horse\n")
    assert res.returncode == 0 and res.stdout == ""  # a given password is not echoed
    assert sw("broker", "config", "--out", str(d), "--port", "1999", "--prefix", "clinic/v2").returncode == 0
    assert BrokerDir(d).accounts() == {"alice": Role.USER}
    assert verify_password("correct horse", (d / "passwd").read_text().split(":", 1)[1].strip())
    acl = (d / "acl").read_text()
    assert "pattern write clinic/v2/ingest/%u" in acl and "stresswatch/v1" not in acl


@pytest.mark.parametrize(
    "bad", ["", "a+b", "a#", "a/b", "al\x00ice", "al\nice", "a\x7f", "a\x9b", "a:b", "a b", "x" * 129]
)
def test_bad_ids_are_rejected_with_one_clear_error(bad: str, tmp_path: Path):
    d = BrokerDir(tmp_path / "b")
    d.write_config()
    with pytest.raises(ConfigError) as err:
        d.add(Role.USER, bad)
    assert "user id" in str(err.value)
    assert d.passwd.read_text() == "" and d.accounts() == {}


def test_bad_id_on_the_command_line_is_one_line_and_nonzero_exit(tmp_path: Path):
    d = tmp_path / "b"
    assert sw("broker", "config", "--out", str(d)).returncode == 0
    res = sw("broker", "add-worker", "team/north", "--dir", str(d))
    assert res.returncode == 78
    assert res.stderr.strip().count("\n") == 0 and "'/'" in res.stderr and "Traceback" not in res.stderr
    assert (d / "passwd").read_text() == ""


def test_provisioning_before_config_says_what_to_run(tmp_path: Path):
    res = sw("broker", "add-user", "alice", "--dir", str(tmp_path / "nowhere"))
    assert res.returncode != 0 and "stresswatch broker config --out" in res.stderr


@pytest.mark.parametrize(
    "args, field",
    [
        (["--tls-cert", "x.crt"], "--tls-*"),
        (["--no-plaintext"], "--no-plaintext"),
        (["--tls-cert", "nope.crt", "--tls-key", "nope.key", "--tls-ca", "nope.ca"], "--tls-cert"),
        (["--prefix", "clinic/#"], "--prefix"),
        (["--host", "0.0.0.0 # all"], "--host"),
    ],
)
def test_config_options_are_checked(args: list[str], field: str, tmp_path: Path):
    res = sw("broker", "config", "--out", str(tmp_path / "b"), *args)
    assert res.returncode == 78 and field in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


# -- hashes, ids, ACL ---------------------------------------------------------------------------

# Written by mosquitto_passwd 2.0.11 on this machine for password "secret".
MOSQUITTO_PASSWD_VECTOR = "$7$101$oS/dNBZAMGjulBfX$osG5l7zj9lnUZMbX1K+hOK3eAfVN+r7wKIIHn+wmV+iA5Kb3x/NfEm9u6mYiDGhIL7Q5+dF+8+UYu0pM+i3oPw=="


def test_our_hash_is_mosquittos_format():
    assert verify_password("secret", MOSQUITTO_PASSWD_VECTOR)
    assert not verify_password("Secret", MOSQUITTO_PASSWD_VECTOR)
    import base64

    salt = base64.b64decode("oS/dNBZAMGjulBfX")
    assert hash_password("secret", iterations=101, salt=salt) == MOSQUITTO_PASSWD_VECTOR
    assert not verify_password("secret", "$6$abc$def") and not verify_password("secret", "plain")


@given(st.text(max_size=40))
def test_accepted_ids_are_safe_topic_levels_and_usernames(value: str):
    try:
        check_account_id(value)
    except ConfigError:
        return
    Topics().alerts(value)  # the topic tree's own check agrees
    assert ":" not in value and not any(c.isspace() for c in value)
    acl = render_acl("p", {value: Role.WORKER})
    assert f"user {value}" in acl.splitlines()


def test_acl_gives_each_role_its_row_of_the_topic_table():
    acl = render_acl("sw/v1", {"stresswatch-engine": Role.ENGINE, "sam": Role.WORKER, "alice": Role.USER}).splitlines()
    assert {"pattern read sw/v1/alerts/%u", "pattern write sw/v1/acks/%u", "pattern write sw/v1/ingest/%u",
            "pattern write sw/v1/consent/%u", "pattern read sw/v1/status/%u", "pattern read sw/v1/engine/status",
            "pattern read sw/v1/ingested/%u"} <= set(acl)  # fmt: skip
    block = acl[acl.index("user sam") + 1 : acl.index("user sam") + 5]
    assert block == ["topic deny sw/v1/ingest/sam", "topic deny sw/v1/ingested/sam", "topic deny sw/v1/consent/sam", "topic deny sw/v1/status/sam"]
    block = acl[acl.index("user alice") + 1 : acl.index("user alice") + 3]
    assert block == ["topic deny sw/v1/alerts/alice", "topic deny sw/v1/acks/alice"]
    assert "topic write sw/v1/alerts/+" in acl and "topic read sw/v1/ingest/+" in acl
    assert "topic write sw/v1/ingested/+" in acl  # the engine's confirmations to companions


def test_private_client_id_is_stable_and_unguessable_without_the_password():
    a = private_client_id("stresswatch-worker-sam", "pw1")
    assert a == private_client_id("stresswatch-worker-sam", "pw1")
    assert a != private_client_id("stresswatch-worker-sam", "pw2") and "pw1" not in a
    assert private_client_id("stresswatch-worker-sam", None) == "stresswatch-worker-sam"


# -- the engine's check -------------------------------------------------------------------------


def test_no_credentials_off_loopback_is_refused_on_loopback_allowed():
    check_broker_security("mqtt://127.0.0.1:1883", None)
    check_broker_security("mqtt://localhost:1883", None)
    check_broker_security("mqtt://[::1]:1883", None)
    for url in ("mqtt://10.0.0.5:1883", "mqtts://broker.example.org", "mqtt://0.0.0.0:1883"):
        with pytest.raises(ConfigError, match="without credentials") as err:
            check_broker_security(url, None)
        assert err.value.field == "mqtt.username"
    check_broker_security("mqtts://broker.example.org", "stresswatch-engine")
    check_broker_security("mqtts://stresswatch-engine:pw@broker.example.org", None)  # user in the URL


def test_a_conf_that_lets_anonymous_clients_in_off_loopback_is_refused(tmp_path: Path):
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883\nallow_anonymous true\n")
    with pytest.raises(ConfigError, match=r"every interface \(line 1\) allows anonymous") as err:
        check_broker_security("mqtt://127.0.0.1:1883", "e", conf=conf)
    assert str(conf) in str(err.value)
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\n")  # loopback only: the demo's case
    check_broker_security("mqtt://127.0.0.1:1883", "e", conf=conf)
    # per-listener: anonymous on loopback, passwords on the public TLS listener
    conf.write_text(
        "per_listener_settings true\nlistener 1883 127.0.0.1\nallow_anonymous true\n"
        "listener 8883 0.0.0.0\ncertfile /x\nallow_anonymous false\npassword_file /p\n"
    )
    check_broker_security("mqtts://10.0.0.5:8883", "e", conf=conf)
    conf.write_text("per_listener_settings true\nlistener 8883 0.0.0.0\nallow_anonymous true\n")
    with pytest.raises(ConfigError):
        check_broker_security("mqtt://127.0.0.1:1883", "e", conf=conf)
    # an included file counts too
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "open.conf").write_text("allow_anonymous true\n")
    conf.write_text("listener 1883 192.168.1.2\ninclude_dir conf.d\n")
    with pytest.raises(ConfigError, match="192.168.1.2"):
        check_broker_security("mqtt://127.0.0.1:1883", "e", conf=conf)


def test_the_generated_conf_passes_the_check(tmp_path: Path):
    d = BrokerDir(tmp_path / "b")
    d.write_config(host="0.0.0.0")
    check_broker_security("mqtt://10.0.0.5:1883", "stresswatch-engine", conf=d.conf)
    facts = parse_mosquitto_conf(d.conf.read_text())
    assert [(f.port, f.bind, f.allow_anonymous) for f in facts] == [(1883, "0.0.0.0", False)]


def test_mosquitto_defaults_are_followed():
    # no listener at all: mosquitto 2.0's local-only mode (loopback 1883, anonymous)
    (f,) = parse_mosquitto_conf("persistence true\n")
    assert f.loopback and f.allow_anonymous
    # allow_anonymous defaults to false in 2.0
    (f,) = parse_mosquitto_conf("listener 1883\n")
    assert not f.allow_anonymous and not f.loopback
    (f,) = parse_mosquitto_conf(mosquitto_conf(port=1, data_dir=Path("/d"), allow_anonymous=True))
    assert f.allow_anonymous and f.loopback
    with pytest.raises(ConfigError, match="line 2"):
        parse_mosquitto_conf("listener 1883\nallow_anonymous maybe\n")


@given(st.text(max_size=200))
def test_conf_parser_raises_only_config_error(text: str):
    try:
        facts = parse_mosquitto_conf(text)
    except ConfigError:
        return
    assert facts  # mosquitto always has a listener


def test_concurrent_provisioning_loses_no_account(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    d = BrokerDir(tmp_path / "b")
    d.write_config()
    ids = [f"user{i}" for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        passwords = dict(zip(ids, pool.map(lambda i: d.add(Role.USER, i), ids)))
    assert d.accounts() == {i: Role.USER for i in ids}
    entries = dict(line.split(":", 1) for line in d.passwd.read_text().splitlines())
    assert sorted(entries) == sorted(ids)
    assert all(verify_password(passwords[i], entries[i]) for i in ids)
    assert all(f"user {i}" in d.acl.read_text().splitlines() for i in ids)


def test_broker_check_command(tmp_path: Path):
    d = tmp_path / "b"
    assert sw("broker", "config", "--out", str(d), "--host", "0.0.0.0").returncode == 0
    ok = sw("broker", "check", "--conf", str(d / "mosquitto.conf"))
    assert ok.returncode == 0 and "no anonymous access" in ok.stdout
    open_conf = tmp_path / "open.conf"
    open_conf.write_text("listener 1883\nallow_anonymous true\n")
    bad = sw("broker", "check", "--conf", str(open_conf))
    assert bad.returncode == 78 and "open.conf" in bad.stderr and "line 1" in bad.stderr
    anon = sw("broker", "check", "--broker", "mqtt://10.1.2.3:1883")
    assert anon.returncode == 78 and "without credentials" in anon.stderr


@pytest.mark.mosquitto
def test_max_packet_size_is_enforced_by_mosquitto(tmp_path: Path):
    """The hook for sizing the broker's packet cap: mosquitto reads the rendered line and
    refuses a larger publish, while one under the cap is delivered."""
    import getpass
    import threading
    import time

    from conftest import MosquittoProcess

    from stresswatch.broker import free_port
    from stresswatch.mqtt import connect

    port = free_port()
    (tmp_path / "data").mkdir()
    conf = tmp_path / "mosquitto.conf"
    text = mosquitto_conf(port=port, data_dir=tmp_path / "data", allow_anonymous=True, run_as=getpass.getuser(), max_packet_size_bytes=4096)
    assert "max_packet_size 4096" in text
    conf.write_text(text)
    broker = MosquittoProcess(port, conf, tmp_path / "data")
    broker.start()
    got: list[int] = []
    arrived = threading.Event()

    def on_message(c, u, msg) -> None:
        got.append(len(msg.payload))
        arrived.set()

    sub = connect(broker.url, "cap-sub", on_message=on_message, timeout_s=5)
    pub = connect(broker.url, "cap-pub", timeout_s=5)
    try:
        done = threading.Event()
        sub.on_subscribe = lambda *a: done.set()
        sub.subscribe("t/#", qos=1)
        assert done.wait(5)
        pub.publish("t/small", b"x" * 1000, qos=1)
        assert arrived.wait(5)
        pub.publish("t/big", b"x" * 8192, qos=1)
        time.sleep(1.0)
        assert got == [1000]  # the larger one never reached the subscriber
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()
        broker.stop()
    with pytest.raises(ConfigError, match="max_packet_size_bytes"):
        mosquitto_conf(port=port, data_dir=tmp_path, max_packet_size_bytes=10)


def test_config_writes_an_ingest_broker_beside_unless_single_broker(tmp_path: Path):
    d = tmp_path / "b"
    res = sw("broker", "config", "--out", str(d), "--port", "18830")
    assert res.returncode == 0, res.stderr
    ingest = (d / "mosquitto-ingest.conf").read_text()
    assert "listener 18831 127.0.0.1" in ingest and "autosave_interval 60" in ingest  # --port + 1 by default
    assert "mosquitto-ingest.conf" in res.stderr and "mqtt.ingest_url" in res.stderr
    assert (d / "data-ingest").is_dir()
    res = sw("broker", "config", "--out", str(d), "--port", "18830", "--ingest-port", "18830")
    assert res.returncode == 78 and "ports of its own" in res.stderr
    res = sw("broker", "config", "--out", str(d), "--port", "18830", "--single-broker")
    assert res.returncode == 0, res.stderr
    assert not (d / "mosquitto-ingest.conf").exists()  # one broker carries everything again
    assert "autosave_on_changes true" in (d / "mosquitto.conf").read_text()
    with pytest.raises(ConfigError, match="unknown broker role"):
        mosquitto_conf(port=1, data_dir=tmp_path, role="other")  # type: ignore[arg-type]
