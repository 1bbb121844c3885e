"""The real ``phi3ops`` command, failing inside a flow: one line and an exit code on stderr, the
traceback only with ``--verbose``; and ``--version`` / ``-h``.

Each run is a subprocess with its own data dir and Prefect home, so Prefect's console logging is
configured exactly as a user's shell gets it (not by pytest's log capture).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REASON = "has no champion to roll back"


def _phi3ops(*args: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        PHI3OPS_DATA_DIR=str(home / "data"),
        PREFECT_HOME=str(home / "prefect"),  # a fresh temporary server database
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_LOGGING_COLORS="false",
    )
    for name in ("PREFECT_API_URL", "PHI3OPS_VERBOSE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow  # runs a flow in a phi3ops process: a Prefect server of its own
def test_a_failure_inside_a_flow_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    result = _phi3ops("rollback", home=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    # Prefect's start/stop and run-state lines, MLflow's first-use lines, and the error.
    assert len(lines) <= 12, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and REASON in errors[0] and "exit code 2" in errors[0], lines


@pytest.mark.slow  # runs a flow in a phi3ops process: a Prefect server of its own
def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    result = _phi3ops("--verbose", "rollback", home=tmp_path)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "phi3ops.errors.RegistryError" in result.stderr and REASON in result.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_and_version(tmp_path: Path, flag: str) -> None:
    helped = _phi3ops(flag, home=tmp_path, timeout=60)
    assert helped.returncode == 0 and "--verbose" in helped.stdout and "rollback" in helped.stdout
    version = _phi3ops("--version", home=tmp_path, timeout=60)
    assert version.returncode == 0
    assert version.stdout.strip() == f"phi3ops {metadata.version('phi3ops')}"
