"""Inputs that used to hang, race or slip through: the tracking store, regexes, policy ranges."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from phi3ops.errors import InvalidInputError, TrackingUnreachableError
from phi3ops.evalset.checks import REGEX_TIMEOUT_S, check_regex
from phi3ops.policies import GatePolicy, MonitorThresholds
from phi3ops.settings import get_settings
from phi3ops.tracking import use_tracking_store
from tests.conftest import REPO_ROOT


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never answers: a hung tracking server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: connection refused


def test_a_silent_tracking_server_fails_within_the_timeout_naming_it(
    silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
    monkeypatch.setenv("PHI3OPS_TRACKING_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match=silent_server) as raised:
        use_tracking_store()
    # MLflow's own client would retry for minutes; the bound is the configured timeout.
    assert time.monotonic() - started < 30
    assert "PHI3OPS_TRACKING_TIMEOUT_S" in str(raised.value)


def test_an_unreachable_tracking_server_is_a_one_line_cli_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.app import app

    url = _refused_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["rollback", "--model-name", "phi3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]  # one line
    assert url in result.output and "Traceback" not in result.output
    # MLflow's later calls retry a bounded number of times, not its default seven.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(get_settings().tracking_max_retries)


@pytest.mark.slow  # starts processes that each import MLflow
def test_processes_that_first_use_a_fresh_sqlite_store_at_once_all_succeed(tmp_path) -> None:
    """MLflow creates a SQLite store's tables unlocked; racing processes used to crash."""
    script = (
        "from phi3ops.tracking import configure_tracking\n"
        "from phi3ops.registry import client\n"
        "configure_tracking()\n"
        "client().search_registered_models()\n"
    )
    env = {**os.environ, "PHI3OPS_DATA_DIR": str(tmp_path / "data")}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)


@pytest.mark.parametrize("pattern", [r"(a|aa)+$", r"(\w+\s?)+$"])
def test_a_catastrophic_regex_fails_its_item_instead_of_hanging(pattern: str) -> None:
    started = time.monotonic()
    verdict = check_regex("a" * 5000 + "!", pattern)
    assert not verdict.passed
    assert "catastrophic backtracking" in verdict.rationale
    assert time.monotonic() - started < REGEX_TIMEOUT_S + 20


def test_regex_expectations_keep_re_semantics() -> None:
    assert check_regex("The answer is 4.", r"\b4\b").passed
    assert not check_regex("The answer is 42.", r"\b4\b").passed
    assert check_regex("line one\nline two", r"one.line").passed  # DOTALL
    assert check_regex("YES", r"(?i)yes").passed
    with pytest.raises(InvalidInputError, match="bad regex"):
        check_regex("x", "(")


def test_policy_ranges_are_checked_by_the_one_model() -> None:
    with pytest.raises(InvalidInputError, match=r"min_tag_pass_rate\.safety"):
        GatePolicy().with_overrides({"min_tag_pass_rate": {"safety": 5}})
    with pytest.raises(InvalidInputError, match="min_response_chars"):
        MonitorThresholds().with_overrides({"min_response_chars": 20000})
    with pytest.raises(InvalidInputError, match="min_records"):
        MonitorThresholds().with_overrides({"min_records": 0})
    assert MonitorThresholds().with_overrides({"min_response_chars": 5}).min_response_chars == 5


def test_setup_against_a_silent_prefect_api_fails_within_the_bound_naming_it(
    silent_server: str, tmp_path
) -> None:
    """Prefect's client retries a timeout five times, 60 s each: setup used to hang for minutes."""
    url = f"{silent_server}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_API_REQUEST_TIMEOUT": "2",
        "PHI3OPS_DATA_DIR": str(tmp_path / "data"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "setup", "--model-name", "phi3"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "[exit code 2" in result.stderr
    assert url in result.stderr and "PREFECT_API_REQUEST_TIMEOUT" in result.stderr
    # The import, then one 2 s try; Prefect's five retries of that timeout took 75 s here.
    assert time.monotonic() - started < 45


def test_the_jobs_prefect_check_fails_within_the_bound_naming_the_url(silent_server: str) -> None:
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_API_URL,
        temporary_settings,
    )

    from deployments.setup import bounded_prefect_api, check_prefect_api
    from phi3ops.errors import OrchestrationError

    url = f"{silent_server}/api"
    with temporary_settings({PREFECT_API_URL: url, PREFECT_API_REQUEST_TIMEOUT: 1.0}):
        started = time.monotonic()
        with pytest.raises(OrchestrationError, match=f"{url} did not answer within 1 s"):
            check_prefect_api()
        with pytest.raises(OrchestrationError, match=url), bounded_prefect_api():
            pass
        assert time.monotonic() - started < 30
    refused = {PREFECT_API_URL: _refused_url() + "/api"}
    with temporary_settings(refused), pytest.raises(OrchestrationError, match="Cannot reach"):
        check_prefect_api()
