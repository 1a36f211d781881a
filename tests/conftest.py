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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
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
