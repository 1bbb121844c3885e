"""Pieces of the e2e stacks: processes that are always stopped, free ports, waiting, a Prefect
server, a PostgreSQL server run as an unprivileged user, and a snapshot of this working tree
as a git repository that workers clone.

Every process started through `Processes` carries a marker in its environment and is stopped
at the end, on failure too, with the processes it started in sessions of their own.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: prefect, phi3ops, mlflow
MARKER = "PHI3OPS_E2E_RUN"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"

T = TypeVar("T")


# --- processes -----------------------------------------------------------------------------


class Processes:
    """Starts commands in their own process groups, logs each to a file, and stops them all:
    their groups, then any process left that carries this run's marker (flow-run processes a
    worker starts in sessions of their own).
    """

    def __init__(self, log_dir: Path, marker: str) -> None:
        self.log_dir = log_dir
        self.marker = marker
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str], *, cwd: Path = REPO_ROOT
    ) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                args,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def run(
        self, args: list[str], env: dict[str, str], *, timeout: float = 120, cwd: Path = REPO_ROOT
    ) -> str:
        """Run a command to completion (in its own group, stopped on timeout); its output."""
        process = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(process)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process, signal.SIGKILL)
            out, _ = process.communicate()
            pytest.fail(f"{' '.join(args)} timed out after {timeout}s:\n{out.decode()[-4000:]}")
        text = out.decode(errors="replace")
        if process.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited {process.returncode}:\n{text[-4000:]}")
        return text

    def log(self, name: str, chars: int = 6000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                kill_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_group(process, signal.SIGKILL)
                process.wait(timeout=5)
        for _ in range(3):  # stragglers: flow-run processes in sessions of their own
            pids = marked_pids(self.marker)
            if not pids:
                return
            for pid in pids:
                signal_pid(pid, signal.SIGKILL)
            time.sleep(0.5)


def kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group a `Processes` command leads (start_new_session)."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


def pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` (``NAME=value``; Linux /proc)."""
    needle = entry.encode()
    pids = []
    for path in Path("/proc").iterdir():
        if not path.name.isdigit() or int(path.name) == os.getpid():
            continue
        try:
            environ = (path / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(path.name))
    return pids


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``PHI3OPS_E2E_RUN=<marker>``."""
    return pids_with_env(f"{MARKER}={marker}")


# --- waiting, ports, URLs ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    logs: Callable[[], str] = lambda: "",
    interval: float = 1.0,
) -> T:
    """``probe()`` once it is not None; fails naming ``what`` (and ``logs()``) after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs()}")


def wait_healthy(
    name: str, url: str, process: subprocess.Popen[bytes], processes: Processes, *, timeout: float
) -> None:
    """Wait for ``url``/health to answer 200; fails with the server's log if it exits first."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{name} did not start:\n{processes.log(name)}")
        time.sleep(0.5)


def flow_run_id(cli_output: str) -> uuid.UUID:
    """The flow run id `prefect deployment run` prints."""
    match = re.search(r"UUID: ([0-9a-f-]{36})", cli_output)
    assert match, cli_output
    return uuid.UUID(match.group(1))


def clean_env(marker: str) -> dict[str, str]:
    """This process's environment without Prefect, phi3ops and MLflow settings, plus the
    marker and the quiet, offline defaults every e2e process gets.
    """
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PHI3OPS_", "MLFLOW_"))
    }
    env.update(
        {
            MARKER: marker,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_TO_API_ENABLED": "false",
            "HF_TOKEN": "",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "GX_ANALYTICS_ENABLED": "false",
        }
    )
    return env


@contextmanager
def prefect_client(api_url: str) -> Iterator[Any]:
    """A Prefect client of that server (not of the test session's harness)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def start_prefect_server(
    processes: Processes, env: dict[str, str], *, port: int, name: str = "server"
) -> subprocess.Popen[bytes]:
    """`prefect server start` on loopback (its database from ``env``), waited for."""
    server = processes.start(
        name,
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
    )
    wait_healthy(name, f"http://127.0.0.1:{port}/api", server, processes, timeout=180)
    return server


# --- PostgreSQL ----------------------------------------------------------------------------


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot run here (a skip reason), or None."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL 15 server binaries in {PG_BIN} (apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root and there is no {PG_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


@dataclass
class Postgres:
    """A throwaway PostgreSQL server on loopback, trust authentication."""

    port: int
    root: Path

    def url(self, database: str, *, driver: str) -> str:
        return f"postgresql+{driver}://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_databases(self, *names: str) -> None:
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres"
        )
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for name in names:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()


@contextmanager
def postgres(processes: Processes, env: dict[str, str]) -> Iterator[Postgres]:
    """Initdb + postgres in a temp dir, as the ``postgres`` user when this runs as root
    (initdb and postgres refuse root); the dir is removed afterwards.
    """
    import psycopg2

    as_user = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp dir: that one is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="phi3ops-pg-"))
    try:
        if as_user:
            user = pwd.getpwnam(PG_USER)
            os.chown(root, user.pw_uid, user.pw_gid)
        data = root / "data"
        processes.run(
            [
                *as_user,
                *(str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER),
                *("--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"),
            ],
            env,
            cwd=root,
        )
        port = free_port()
        server = processes.start(
            "postgres",
            [
                *as_user,
                *(str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1"),
                # Sockets in the temp dir (not /var/run); no fsync: the data is thrown away.
                *("-k", str(root), "-c", "fsync=off", "-c", "max_connections=200"),
            ],
            env,
            cwd=root,
        )

        def accepting() -> bool | None:
            if server.poll() is not None:
                pytest.fail(f"postgres exited:\n{processes.log('postgres')}")
            try:
                psycopg2.connect(
                    host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", connect_timeout=2
                ).close()
            except psycopg2.OperationalError:
                return None
            return True

        wait_for("postgres", accepting, timeout=60, interval=0.3)
        yield Postgres(port=port, root=root)
    finally:
        # The caller's Processes stops the server; the files go once it has (or now, if it
        # never started).
        processes.stop_all()
        shutil.rmtree(root, ignore_errors=True)


# --- the code the workers clone ------------------------------------------------------------


def snapshot_repository(dest: Path, *, branch: str = "main") -> Path:
    """A bare git repository whose ``branch`` holds this working tree as it is now (tracked and
    untracked files, minus ignored ones), so that workers cloning it run the code under test,
    not the last commit.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    tree = dest / "snapshot"
    for raw in filter(None, listed):
        source = REPO_ROOT / raw.decode()
        if source.is_file():  # deleted but still in the index: left out, as in the tree
            target = tree / raw.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git = ["git", "-c", "user.name=phi3ops-e2e", "-c", "user.email=e2e@phi3ops.invalid"]
    subprocess.run([*git, "init", "-q", "-b", branch, str(tree)], check=True)
    subprocess.run([*git, "-C", str(tree), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(tree), "commit", "-q", "-m", "snapshot"], check=True)
    bare = dest / "phi3ops.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(tree), str(bare)], check=True)
    return bare
