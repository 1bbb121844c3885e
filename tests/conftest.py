"""Shared fixtures: every test is offline and isolated (own data dir, no token, no real hub)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Build caches outlive a test session: they are keyed by a hash of the recipe that made them.
TEST_CACHE = Path(os.environ.get("PHI3OPS_TEST_CACHE", REPO_ROOT / ".data" / "test-cache"))

# Before anything imports huggingface_hub / prefect: no real hub, no telemetry, quiet bars.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: a leak to "the hub" fails fast
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# The session's Prefect harness is a server at a URL, so `auto` would take the alias lock from
# Prefect limits, which no test model has: the file lock, unless a test asks for the other.
os.environ["PHI3OPS_ALIAS_LOCK"] = "file"


#: Fixtures that make a test slow by themselves: a Prefect server (13-18 s to start here) or the
#: tiny Phi-3. A test that uses one is marked ``slow`` here, so no test has to remember to.
SLOW_FIXTURES = frozenset({"prefect_harness", "tiny_phi3"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that needs a Prefect server or the tiny model (`SLOW_FIXTURES`),
    directly or through another fixture; `make test-fast` deselects them.
    """
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data dir per test, no Hugging Face token, settings re-read."""
    from phi3ops.settings import get_settings

    data_dir = tmp_path / "data"
    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(data_dir))
    monkeypatch.delenv("PHI3OPS_HF_ENDPOINT", raising=False)
    monkeypatch.delenv("PHI3OPS_HF_TOKEN_SECRET_BLOCK", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # each test: its own store
        monkeypatch.setenv(name, "")  # setenv first, so the delenv is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file, no shared cache
    get_settings.cache_clear()
    yield data_dir
    get_settings.cache_clear()


class _InstantTime:
    """Stands in for huggingface_hub's `time` module: records backoff sleeps, sleeps none."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.fixture
def no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Keeps retry tests fast; returns the sleeps huggingface_hub asked for."""
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    fake = _InstantTime()
    monkeypatch.setattr(_http, "time", fake)
    monkeypatch.setattr(file_download, "time", fake)
    return fake.sleeps


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_phi3():
    """The tiny random Phi-3 (PyTorch + ONNX int4 layouts), built once and cached by recipe."""
    from offline.tiny_phi3 import ensure_tiny_phi3

    return ensure_tiny_phi3(TEST_CACHE / "tiny-phi3")


@pytest.fixture
def local_hub() -> Iterator:
    """A local hub on a free loopback port, empty; tests add the repos they need."""
    from huggingface_hub.utils import close_session

    from offline.local_hub import LocalHub

    with LocalHub() as hub:
        yield hub
    close_session()  # no pooled keep-alive connection outlives the server


@pytest.fixture
def hub_with_tiny_phi3(local_hub, tiny_phi3, monkeypatch: pytest.MonkeyPatch):
    """The local hub serving both tiny Phi-3 repos under their real repo ids."""
    from phi3ops.settings import get_settings
    from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID

    local_hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
    local_hub.add_repo(PYTORCH_REPO_ID, tiny_phi3.pytorch_dir)
    monkeypatch.setenv("PHI3OPS_HF_ENDPOINT", local_hub.url)
    get_settings.cache_clear()
    return local_hub
