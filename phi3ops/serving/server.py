"""Serve a registered model over HTTP (`phi3ops serve`).

The server is MLflow's scoring server (what ``mlflow models serve --env-manager local`` runs:
uvicorn over ``mlflow.pyfunc.scoring_server.init``), built by `phi3ops.serving.app` with a
guard in front of it. Like ``mlflow models serve``, it first downloads the model (resolving
``models:/<name>@<alias>`` to a version), then starts uvicorn on that folder; served from an
alias, each worker then follows the alias as it moves (`phi3ops.serving.follow`). It answers
``POST /invocations`` with MLflow's ``{"inputs": ...}`` / ``{"dataframe_records": ...}``
payloads or the bare OpenAI-style ``{"messages": [...], "max_tokens": ...}`` body, and
``GET /ping`` / ``GET /health``.

It also answers OpenAI's ``POST /v1/chat/completions`` and ``GET /v1/models``. A request
with no answer within the request timeout is cancelled (504); on ``SIGTERM`` the server stops
accepting, drains the requests in flight (at most that timeout and a margin), then exits.

The server cannot outlive what started it: on Linux, uvicorn gets ``SIGTERM`` (a graceful stop,
which stores its spooled inference records) when the thread that started it dies, even by
``kill -9``. A port that cannot be bound fails `start_server` before anything is downloaded.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from phi3ops.errors import InvalidInputError
from phi3ops.serving.app import (
    DOWNLOAD_DIR_ENV,
    MODEL_NAME_ENV,
    MODEL_PATH_ENV,
    MODEL_URI_ENV,
    MODEL_VERSION_ENV,
    POLL_ENV,
)
from phi3ops.serving.follow import MODEL_URI, check_model_uri, download_model
from phi3ops.serving.model_copies import COPY_PREFIX, claim, reclaim_orphans
from phi3ops.serving.model_folder import read_mlmodel
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
#: Seconds a stopping server gives in-flight requests beyond the request timeout.
DRAIN_MARGIN_S = 5
#: Seconds `stop_server` gives a server beyond its drain to store its records and exit.
_EXIT_MARGIN_S = 20


def model_uri_for(model_name: str, *, alias: str | None = None, version: str | None = None) -> str:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (exactly one of the two)."""
    if bool(alias) == bool(version):
        raise InvalidInputError(
            "Give exactly one of alias (e.g. 'champion') and version (e.g. '3') to pick what to "
            "serve."
        )
    return f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version}"


def check_port_free(host: str, port: int) -> None:
    """Fail now, with the reason, when uvicorn could not listen on ``host:port``.

    Raises:
        InvalidInputError: The address cannot be bound (another process holds the port, or the
            host is not an address of this machine).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(address)
    except OSError as exc:
        raise InvalidInputError(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Another process may hold "
            f"the port: stop it or pick another --port."
        ) from exc


def registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) that ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` points at
    now; None for any other URI (its requests are served but not recorded).
    """
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not match:
        return None
    name, alias, version = match.groups()
    if version:
        return name, version
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:
        return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise InvalidInputError(
            f"Cannot load {model_uri}: {exc.message} Check the name and alias with `mlflow ui` "
            f"(or the registry of MLFLOW_TRACKING_URI)."
        ) from exc


def request_timeout(timeout_s: int | None = None) -> int:
    """The request timeout in seconds: ``timeout_s``, else MLflow's
    ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (60 by default).

    Raises:
        InvalidInputError: The timeout is not a positive number of seconds.
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    try:
        timeout = (
            int(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()) if timeout_s is None else timeout_s
        )
    except ValueError as exc:
        raise InvalidInputError(
            f"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT is not a whole number of seconds: {exc}"
        ) from exc
    if timeout < 1:
        raise InvalidInputError(f"timeout={timeout}: use 1 second or more.")
    return timeout


def serve_command(
    model_path: Path, *, host: str, port: int, workers: int = 1, timeout_s: int = 60
) -> list[str]:
    """The uvicorn command line serving the downloaded model at ``model_path``.

    On ``SIGTERM`` uvicorn stops accepting connections and lets the requests in flight finish
    for up to ``timeout_s`` (the request timeout) plus `DRAIN_MARGIN_S` seconds
    (``--timeout-graceful-shutdown``), then stores its spooled records and exits.
    """
    if not 0 < port < 65536:
        raise InvalidInputError(f"port {port} is out of range: use 1-65535.")
    if workers < 1:
        raise InvalidInputError(f"workers={workers}: use 1 or more.")
    if timeout_s < 1:
        raise InvalidInputError(f"timeout={timeout_s}: use 1 second or more.")
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "phi3ops.serving.app:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--timeout-graceful-shutdown",
        str(timeout_s + DRAIN_MARGIN_S),
    ]


#: The ONNX flavor's batcher settings (its ``model_config``) that serving may change at load.
BATCHING_KEYS = ("max_batch_size", "max_queue", "batch_wait_ms")
#: MLflow's variable with ``model_config`` overrides for the scoring server's model.
_SERVING_MODEL_CONFIG = "SERVING_MODEL_CONFIG"


def batching_env(model_path: Path, batching: Mapping[str, float] | None) -> dict[str, str]:
    """The environment that loads the model at ``model_path`` with ``batching`` changed.

    Raises:
        InvalidInputError: An unknown setting, a transformers model (MLflow's pipeline has no
            batcher across requests), or a version packaged before the settings were logged.
    """
    if not batching:
        return {}
    unknown = sorted(set(batching) - set(BATCHING_KEYS))
    if unknown:
        raise InvalidInputError(f"Unknown batching setting(s) {unknown}: use {BATCHING_KEYS}.")
    flavors = read_mlmodel(model_path).get("flavors", {})
    if "transformers" in flavors:
        raise InvalidInputError(
            "--max-batch-size, --max-queue and --batch-wait-ms apply to the onnx flavor; this "
            "is a transformers model, whose pipeline batches within one request only."
        )
    logged = flavors.get("python_function", {}).get("config") or {}
    missing = sorted(key for key in batching if key not in logged)
    if missing:
        raise InvalidInputError(
            f"This version was packaged before {', '.join(missing)} could be set at serving "
            f"time: serve it without the batching options, or package it again."
        )
    return {_SERVING_MODEL_CONFIG: json.dumps(dict(batching))}


def start_server(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5001,
    workers: int = 1,
    timeout_s: int | None = None,
    batching: Mapping[str, float] | None = None,
    poll_s: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    **popen_kwargs: Any,  # passed on to subprocess.Popen, whose keywords differ in type
) -> subprocess.Popen:
    """Download ``model_uri`` and start serving it in the background.

    ``batching`` changes the ONNX flavor's batcher (`BATCHING_KEYS`) for this server.
    A request with no answer within ``timeout_s`` seconds (default: MLflow's
    ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``, 60) is cancelled with a 504 and recorded.
    Served from ``models:/<name>@<alias>``, each worker looks at the alias every ``poll_s``
    seconds (default: ``PHI3OPS_SERVE_POLL_S``; 0: never) and switches to the version it moves
    to (`phi3ops.serving.follow`); every version is downloaded under one folder of
    ``<data dir>/serving``, which `stop_server` removes (or, after a ``SIGKILL``, the next
    `start_server`: `phi3ops.serving.model_copies`).

    The server gets a session of its own, so `stop_server` can stop uvicorn's workers with it,
    and, on Linux, a ``SIGTERM`` when the calling thread dies (started from the main thread:
    when this process dies), so a killed caller leaves no server behind.
    A registered version's requests are recorded as MLflow traces (`phi3ops.serving.records`),
    each tagged with the version that answered it.
    """
    if poll_s is not None and poll_s < 0:
        raise InvalidInputError(f"poll_s={poll_s}: use 0 (never look) or more seconds.")
    timeout = request_timeout(timeout_s)
    command = serve_command(Path("."), host=host, port=port, workers=workers, timeout_s=timeout)
    check_model_uri(model_uri)
    check_port_free(host, port)
    parent = get_settings().data_dir / "serving"
    parent.mkdir(parents=True, exist_ok=True)
    reclaim_orphans(parent)  # copies of killed servers (phi3ops.serving.model_copies)
    download_dir = Path(tempfile.mkdtemp(prefix=COPY_PREFIX, dir=parent))
    claim(download_dir)
    try:
        served = registered_version(model_uri) if MODEL_URI.match(model_uri) else None
        pinned = f"models:/{served[0]}/{served[1]}" if served else model_uri
        model_path = download_model(pinned, download_dir / "first")
        env = {
            **os.environ,
            **(extra_env or {}),
            MODEL_PATH_ENV: str(model_path),
            MODEL_URI_ENV: model_uri,
            DOWNLOAD_DIR_ENV: str(download_dir),
            "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(timeout),
            **batching_env(model_path, batching),
        }
        if served is not None:
            env[MODEL_NAME_ENV], env[MODEL_VERSION_ENV] = served
        if poll_s is not None:
            env[POLL_ENV] = str(poll_s)
        process = subprocess.Popen(
            command,
            env=env,
            start_new_session=True,
            preexec_fn=_dies_with_this_thread(),
            **popen_kwargs,
        )
        claim(download_dir, process.pid)
    except BaseException:
        shutil.rmtree(download_dir, ignore_errors=True)
        raise
    process.download_dir = download_dir  # type: ignore[attr-defined]  # removed by stop_server
    # for stop_server: the drain, after serving on for the drain delay (operations.py)
    process.drain_s = timeout + DRAIN_MARGIN_S + get_settings().serve_drain_delay_s  # type: ignore[attr-defined]
    return process


def _dies_with_this_thread() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child ``SIGTERM`` when its parent dies
    (``PR_SET_PDEATHSIG``); None elsewhere, or off the main thread (whose end would stop it).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def wait_until_ready(process: subprocess.Popen, url: str, *, timeout: float = 180.0) -> None:
    """Poll ``GET {url}/ping`` until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"The model server exited with code {process.returncode} before it was ready; "
                f"its output says why."
            )
        try:
            if httpx.get(f"{url}/ping", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"The model server at {url} was not ready within {timeout:.0f} s.")


def stop_server(process: subprocess.Popen, *, timeout: float | None = None) -> None:
    """Stop the server and every worker it started, and remove its downloaded model.

    ``SIGTERM`` first: the server drains the requests in flight and stores its records; it is
    killed if it has not exited after ``timeout`` seconds (default: its drain time plus 20).
    """
    if timeout is None:
        timeout = getattr(process, "drain_s", 0) + _EXIT_MARGIN_S
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the group is gone already
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        break
    download_dir = getattr(process, "download_dir", None)
    if download_dir is not None:
        shutil.rmtree(download_dir, ignore_errors=True)
