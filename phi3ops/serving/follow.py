"""Which loaded version answers a request, and following a registry alias as it moves.

A server started on ``models:/<name>@<alias>`` keeps serving what the alias points at: an
`AliasFollower` thread asks the registry every ``PHI3OPS_SERVE_POLL_S`` seconds which version
the alias names and, when it moved (a promotion, a rollback), downloads and loads that version
beside the one serving, then hands it to the `ModelSwitcher`. The switcher is the one owner of
"the current model": each request takes the current `LoadedModel` when it starts
(`ModelSwitcher.acquire`) and gives it back when its answer is complete
(`ModelSwitcher.release`), so a switch never interrupts a request: requests in flight finish on
the version they started with, new ones go to the new version, and the old one is released
(its own download folder removed) when its last request ends. A version that cannot be
downloaded or loaded leaves the serving one in place; a warning names the version and the
error, and it is tried again only after ``retry_s`` seconds (or when the alias moves again).

Also here: fetching a model folder from any MLflow location (`download_model`), which
`phi3ops.serving.server` uses for the version it starts with.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from phi3ops.errors import InvalidInputError
from phi3ops.registry import alias_version
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.records import InferenceRecorder
from phi3ops.tracking import configure_tracking

_log = logging.getLogger(__name__)

#: MLflow model locations other than a local folder: the registry, a run, a remote store.
MODEL_URI = re.compile(r"^(models|runs):/.+|^[a-z][a-z0-9+.-]*://.+")
_ALIAS_URI = re.compile(r"models:/([^/@]+)@([^/@]+)")
#: Seconds before a version that failed to load is tried again while the alias still names it.
RETRY_FAILED_S = 300.0


class ContextLimit(Protocol):
    """Checks that a chat row fits the model's context (the transformers flavor's check)."""

    def problem(self, request: Any) -> str | None:
        """Why ``request`` cannot fit, or None."""


@dataclass(eq=False)
class LoadedModel:
    """One loaded model version and everything that answers with it.

    Attributes:
        app: MLflow's scoring app for this model (answers ``/invocations``, ``/ping``...).
        model: The loaded pyfunc (its ``predict_stream`` answers streams).
        served: How the OpenAI routes name it (``<name>/<version>``).
        version: Its registry version; None when it is not a registered version.
        limit: The context check of a transformers model; None for the ONNX flavor.
        recorder: Where its requests are recorded, tagged with its version; None records none.
        folder: A download folder of its own, removed once it is released; None when the
            folder is someone else's to remove (the one `start_server` downloaded).
        users: Requests answering with it now (kept by `ModelSwitcher`).
        retired: No new request gets it; it is released when ``users`` reaches 0.
        released: Its folder is removed and nothing answers with it any more.
    """

    app: Any
    model: Any
    served: ServedModel
    version: str | None = None
    limit: ContextLimit | None = None
    recorder: InferenceRecorder | None = None
    folder: Path | None = None
    users: int = field(default=0, init=False)
    retired: bool = field(default=False, init=False)
    released: bool = field(default=False, init=False)


class ModelSwitcher:
    """The one owner of the model that answers new requests; see the module docstring.

    Args:
        first: The model served from the start.
    """

    def __init__(self, first: LoadedModel) -> None:
        self._lock = threading.Lock()
        self._current = first
        self._closed = False

    @property
    def current(self) -> LoadedModel:
        """The model new requests get."""
        with self._lock:
            return self._current

    def acquire(self) -> LoadedModel:
        """The current model, counted as in use until `release` is called with it."""
        with self._lock:
            loaded = self._current
            loaded.users += 1
            return loaded

    def release(self, loaded: LoadedModel) -> None:
        """Ends one use of ``loaded``; a retired model is released when its last use ends."""
        with self._lock:
            if loaded.users <= 0:
                raise RuntimeError(f"version {loaded.version} was released more often than taken")
            loaded.users -= 1
            done = loaded.retired and loaded.users == 0
        if done:
            _free(loaded)

    @contextlib.contextmanager
    def using(self) -> Iterator[LoadedModel]:
        """`acquire`, then `release` when the block ends, however it ends."""
        loaded = self.acquire()
        try:
            yield loaded
        finally:
            self.release(loaded)

    def switch(self, new: LoadedModel) -> LoadedModel:
        """Makes ``new`` the model of every request that starts from now on; the one it
        replaces is released as soon as its requests in flight have finished.

        Returns:
            The model replaced (``new`` itself, released at once, after `close`).
        """
        with self._lock:
            if self._closed:
                old = new
            else:
                old, self._current = self._current, new
            old.retired = True
            done = old.users == 0
        if done:
            _free(old)
        return old

    def close(self) -> None:
        """At shutdown: the current model is released once its requests have finished, and
        no model can be switched to any more.
        """
        with self._lock:
            self._closed = True
            current = self._current
            current.retired = True
            done = current.users == 0
        if done:
            _free(current)


def _free(loaded: LoadedModel) -> None:
    """Releases a retired model nobody uses: its own download folder goes."""
    if loaded.released:
        return
    loaded.released = True
    if loaded.folder is not None:
        shutil.rmtree(loaded.folder, ignore_errors=True)
    _log.info("Released version %s: its last request has finished.", loaded.version)


def alias_of(model_uri: str | None) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/<name>@<alias>`` URI; None for any other (nothing to follow)."""
    match = _ALIAS_URI.fullmatch(model_uri or "")
    return (match.group(1), match.group(2)) if match else None


class AliasFollower:
    """Keeps a `ModelSwitcher` on the version ``models:/<model_name>@<alias>`` points at.

    Args:
        switcher: Where a new version goes once it is loaded.
        model_name: The registered model.
        alias: The alias followed (``champion``, ``candidate``).
        load: Loads the downloaded model folder of a version: ``load(version, path)``.
        download_dir: Where versions are downloaded, each into a folder of its own.
        poll_s: Seconds between looks at the registry.
        retry_s: Seconds before a version that failed to load is tried again.
    """

    def __init__(
        self,
        switcher: ModelSwitcher,
        *,
        model_name: str,
        alias: str,
        load: Callable[[str, Path], LoadedModel],
        download_dir: Path,
        poll_s: float,
        retry_s: float = RETRY_FAILED_S,
    ) -> None:
        if poll_s <= 0:
            raise InvalidInputError(f"poll_s={poll_s}: use a positive number of seconds.")
        self.switcher = switcher
        self.model_name = model_name
        self.alias = alias
        self.load = load
        self.download_dir = download_dir
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._failed: dict[str, float] = {}  # version -> when it last failed (monotonic)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        """The URI followed."""
        return f"models:/{self.model_name}@{self.alias}"

    def start(self) -> AliasFollower:
        """Starts looking at the registry every ``poll_s`` seconds, in a thread of its own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="phi3ops-follow", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops looking; waits up to ``timeout`` seconds for a load in progress to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception:  # the thread must outlive anything one look can raise
                _log.exception("Following %s failed this time; trying again.", self.uri)

    def poll_once(self) -> str | None:
        """One look at the registry: switches when the alias moved to a version that loads.

        Returns:
            The version switched to, or None when nothing changed.
        """
        serving = self.switcher.current.version
        try:
            version = alias_version(self.model_name, self.alias)
        except Exception as exc:  # an unreachable store must not stop the serving
            _log.warning(
                "Cannot read %s from the registry (%s); still serving version %s.",
                self.uri,
                exc,
                serving,
            )
            return None
        if version not in self._failed:
            self._failed.clear()  # the alias moved on: a version it comes back to is tried again
        if version is None or version == serving:
            return None
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed < self.retry_s:
            return None
        _log.info(
            "%s moved from version %s to %s: loading it beside the one serving.",
            self.uri,
            serving,
            version,
        )
        self.download_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.download_dir))
        try:
            path = download_model(f"models:/{self.model_name}/{version}", folder)
            loaded = self.load(version, path)
        except Exception as exc:  # whatever a broken version raises, the old one keeps serving
            shutil.rmtree(folder, ignore_errors=True)
            self._failed[version] = time.monotonic()
            _log.warning(
                "Cannot serve version %s of %s (%s now points at it): %s. Still serving version "
                "%s; version %s is tried again in %.0f s or when the alias moves.",
                version,
                self.model_name,
                self.uri,
                exc,
                serving,
                version,
                self.retry_s,
            )
            return None
        loaded.folder = folder
        self._failed.pop(version, None)
        old = self.switcher.switch(loaded)
        _log.info(
            "Now serving version %s of %s (%s); version %s is released once its requests in "
            "flight have finished.",
            version,
            self.model_name,
            self.uri,
            old.version,
        )
        return version


def check_model_uri(model_uri: str) -> None:
    """Refuse anything but an MLflow model location, before anything is copied.

    Accepted: ``models:/...``, ``runs:/...``, a remote store URI (``s3://``...), or a local
    folder (a path or ``file://``) holding an ``MLmodel`` file.

    Raises:
        InvalidInputError: ``model_uri`` is none of those.
    """
    local = _local_folder(model_uri)
    if local is None:
        if MODEL_URI.match(model_uri):
            return
        if "://" not in model_uri and ":/" not in model_uri:
            local = Path(model_uri).expanduser()
    if local is not None and (local / "MLmodel").is_file():
        return
    raise InvalidInputError(
        f"model_uri {model_uri!r} is not an MLflow model URI: use models:/<name>@<alias>, "
        f"models:/<name>/<version>, runs:/<run id>/<path>, a model store URI, or a local "
        f"folder that holds an MLmodel file."
    )


def download_model(model_uri: str, target: Path) -> Path:
    """Resolve ``model_uri`` once and copy the model into ``target``; returns the model folder.

    Raises:
        InvalidInputError: ``model_uri`` is not an MLflow model location (`check_model_uri`),
            cannot be loaded, or what it points at has no MLmodel file.
    """
    check_model_uri(model_uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:
        path = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target))
        )
    except MlflowException as exc:
        raise InvalidInputError(
            f"Cannot load {model_uri}: {exc.message} Check the name and alias/version with "
            f"`mlflow ui` (or the registry of MLFLOW_TRACKING_URI)."
        ) from exc
    if not (path / "MLmodel").is_file():
        raise InvalidInputError(
            f"{model_uri} is not an MLflow model: what it points at has no MLmodel file."
        )
    return path


def _local_folder(model_uri: str) -> Path | None:
    """The folder of a ``file://`` URI, else None."""
    if model_uri.startswith("file://"):
        return Path(model_uri.removeprefix("file://")).expanduser()
    return None
