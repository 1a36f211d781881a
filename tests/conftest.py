"""Shared fixtures. Brokers are real: each test that needs one starts its own Mosquitto on a
free loopback port with a config written for it, and stops it after."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stresswatch.broker import free_port, mosquitto_conf

MOSQUITTO = shutil.which("mosquitto") or (Path("/usr/sbin/mosquitto") if Path("/usr/sbin/mosquitto").exists() else None)


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, output, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``proc`` accepts connections on loopback ``port``; its ``output()`` in the
    error if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open its port")


@dataclass
class MosquittoProcess:
    port: int
    conf: Path
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if MOSQUITTO is None:
            pytest.fail("mosquitto is not installed: the tests need a real broker (apt-get install mosquitto)")
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)], stderr=subprocess.PIPE)
        proc = self.proc
        wait_listening(proc, self.port, "mosquitto", lambda: proc.stderr.read().decode() if proc.stderr else "")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no chance to save anything (persistence must already be on disk)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """An anonymous-loopback Mosquitto for pipeline tests (auth and ACL have their own tests)."""
    port = free_port()
    data = tmp_path / "mosquitto"
    data.mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(mosquitto_conf(port=port, data_dir=data, allow_anonymous=True, run_as=getpass.getuser()))
    broker = MosquittoProcess(port, conf, data)
    broker.start()
    yield broker
    broker.stop()


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session")
def demo_cohort() -> Path:
    return FIXTURES / "demo_cohort.parquet"


# -- a fast synthetic stream for engine tests (alerts within minutes of data) ---------------
FAST_DETECTOR = {
    "window_s": 60,
    "baseline_slots": 1,
    "baseline_refresh_s": 60,
    "baseline_windows": 10,
    "baseline_min_windows": 5,
    "sustain_windows": 1,
    "exit_windows": 1,
    "cooldown_s": 0,
    # the synthetic stress below lifts HR by 25 %, which the defaults take for a walk when the
    # source reports no steps (docs/DETECTOR.md, section 3)
    "activity_hr_ratio_without_motion": 1.3,
}


def synthetic_rr(user: str, start_s: int, cycles: int, *, seed: int = 0, window_s: int = 60):
    """RR samples: 6 calm windows (60 bpm, high HRV), then per cycle 2 'stressed' windows
    (75 bpm, almost no HRV) and 6 calm ones. With FAST_DETECTOR each cycle raises one alert."""
    import numpy as np
    import polars as pl

    from stresswatch.model import SAMPLES_SCHEMA

    rng = np.random.default_rng(seed)
    plan = [0] * 6 * window_s
    for _ in range(cycles):
        plan += [1] * 2 * window_s + [0] * 6 * window_s
    t, end, times, vals = float(start_s), start_s + len(plan), [], []
    while t < end:
        rr = 800 + rng.normal(0, 4) if plan[int(t - start_s)] else 1000 + rng.normal(0, 60)
        t += rr / 1000
        times.append(int(t * 1e9))
        vals.append(rr)
    n = len(times)
    return pl.DataFrame(
        {
            "user": [user] * n,
            "time": pl.Series(times).cast(pl.Datetime("ns")).dt.replace_time_zone("UTC"),
            "metric": ["rr_ms"] * n,
            "value": vals,
            "source": ["synthetic"] * n,
        },
        schema=SAMPLES_SCHEMA,
    )


@pytest.fixture(scope="session")
def rr_stream():
    return synthetic_rr


# -- the project's own broker, from `stresswatch broker config` output -------------------------
@dataclass
class SecureBroker:
    """A Mosquitto running the directory `stresswatch broker config` wrote, with accounts
    provisioned through `stresswatch broker add-*` (passwords kept here for the tests)."""

    dir: Path
    process: MosquittoProcess
    port: int | None
    tls_port: int | None
    passwords: dict[str, str]
    ingest: MosquittoProcess | None = None  # the ingest broker (mosquitto-ingest.conf), when started

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def ingest_url(self) -> str:
        assert self.ingest is not None
        return self.ingest.url

    def tls_url(self, cafile: Path) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}?cafile={cafile}"

    def add(self, role: str, account_id: str) -> str:
        """Provision through the CLI; a running broker picks it up after :meth:`reload`."""
        from stresswatch.cli import main

        password = f"pw-{account_id}-{len(self.passwords)}"
        pw_file = self.dir.parent / f"{role}-{len(self.passwords)}.pw"
        pw_file.write_text(password + "\n")
        assert main(["broker", f"add-{role}", account_id, "--dir", str(self.dir), "--password-file", str(pw_file)]) == 0
        self.passwords[account_id] = password
        return password

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads the password file and the ACL."""
        import signal

        for p in (self.process, self.ingest):
            if p is not None:
                assert p.proc is not None
                p.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)


ACCOUNTS = {"stresswatch-engine": "engine", "sam": "worker", "kim": "worker", "alice": "user", "bob": "user"}


@pytest.fixture
def make_secure_broker(tmp_path: Path) -> Iterator[object]:
    """``make_secure_broker(*config_args, accounts=ACCOUNTS)``: run `broker config --out`,
    provision ``accounts``, start mosquitto on it. Stopped after the test."""
    from stresswatch.cli import main

    started: list[SecureBroker] = []

    def make(*config_args: str, accounts: dict[str, str] = ACCOUNTS, plaintext: bool = True, ingest: bool = False) -> SecureBroker:
        """``ingest``: also start the ingest broker `broker config` writes beside it."""
        d = tmp_path / f"broker{len(started)}"
        port = free_port() if plaintext else None
        tls_port = free_port() if "--tls-cert" in config_args else None
        ingest_port = free_port()
        args = ["broker", "config", "--out", str(d), "--ingest-port", str(ingest_port)]
        args += ["--port", str(port)] if port else ["--no-plaintext"]
        args += ["--tls-port", str(tls_port), "--ingest-tls-port", str(free_port())] if tls_port else []
        assert main([*args, *config_args]) == 0
        broker = SecureBroker(d, MosquittoProcess(port or tls_port or 0, d / "mosquitto.conf", d / "data"), port, tls_port, {})
        if ingest:
            broker.ingest = MosquittoProcess(ingest_port, d / "mosquitto-ingest.conf", d / "data-ingest")
        for account_id, role in accounts.items():
            broker.add(role, account_id)
        broker.process.start()
        if broker.ingest is not None:
            broker.ingest.start()
        started.append(broker)
        return broker

    yield make
    for b in started:
        b.process.stop()
        if b.ingest is not None:
            b.ingest.stop()


@pytest.fixture
def secure_broker(make_secure_broker) -> SecureBroker:
    """The generated broker on loopback, with an engine, workers sam and kim, users alice and bob."""
    return make_secure_broker()


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds; the last answer is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()
