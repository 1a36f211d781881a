"""Features behind pip extras: without the extra, one error line naming it, non-zero exit,
no traceback, and nothing written (the check runs before any work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stresswatch.extras import MissingExtra

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _without(modules: list[str], tmp_path: Path) -> dict[str, str]:
    """An environment in which importing ``modules`` fails, as if the extra were not installed."""
    shadow = tmp_path / "shadow"
    for m in modules:
        (shadow / m).mkdir(parents=True)
        (shadow / m / "__init__.py").write_text(f"raise ImportError('{m} is not installed')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRESSWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")])
    env["STRESSWATCH_STORE__STATE_DIR"] = str(tmp_path / "state")
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stresswatch.cli", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("modules", "args", "extra"),
    [
        (["matplotlib"], ["replay", str(FIXTURES / "demo_cohort.parquet"), "--out", "{out}", "--plot"], "plot"),
        (["bleak"], ["pair", "--user", "alice", "--scan-s", "0.1"], "ble"),
    ],
)
def test_a_missing_extra_is_one_clear_line(modules, args, extra, tmp_path):
    out = tmp_path / "out"
    run = _run([a.replace("{out}", str(out)) for a in args], _without(modules, tmp_path))
    assert run.returncode == MissingExtra.exit_code, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stresswatch: error: "), run.stderr
    assert f"needs the {extra} extra: pip install 'stresswatch[{extra}]'" in lines[0]
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_the_simulator_names_its_extra(tmp_path):
    code = "from stresswatch_fixtures.cohort import CohortSpec, simulate\nsimulate(CohortSpec(users=1, days=1))"
    run = subprocess.run([sys.executable, "-c", code], env=_without(["scipy"], tmp_path), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "needs the sim extra: pip install 'stresswatch[sim]'" in run.stderr
