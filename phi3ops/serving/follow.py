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

Fetching a version's folder is `phi3ops.serving.downloads`' (re-exported here).
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
from phi3ops.serving.downloads import MODEL_URI as MODEL_URI  # re-exported
from phi3ops.serving.downloads import check_model_uri as check_model_uri
from phi3ops.serving.downloads import download_model
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.records import InferenceRecorder
from phi3ops.traffic import Arm, TrafficPlan, read_plan

_log = logging.getLogger(__name__)

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
        served: How the OpenAI routes name it now (``<name>/<version>``; while a traffic plan
            is in force the registered name, every arm's names accepted: `ModelSwitcher`).
        version: Its registry version; None when it is not a registered version.
        limit: The context check of a transformers model; None for the ONNX flavor.
        recorder: Where its requests are recorded, tagged with its version; None records none.
        folder: A download folder of its own, removed once it is released; None when the
            folder is someone else's to remove (the one `start_server` downloaded).
        streams: Its model answers ``predict_stream`` (the ONNX flavor; MLflow's transformers
            pyfunc cannot).
        users: Requests answering with it now (kept by `ModelSwitcher`).
        retired: No new request gets it; it is released when ``users`` reaches 0.
        released: Nothing answers with it any more; its folder is being removed.
        removal: The thread removing its folder (join it to wait for the folder to go).
    """

    app: Any
    model: Any
    served: ServedModel
    version: str | None = None
    limit: ContextLimit | None = None
    recorder: InferenceRecorder | None = None
    folder: Path | None = None
    streams: bool = True
    removal: threading.Thread | None = field(default=None, init=False)
    own: ServedModel = field(init=False)  # ``served`` as loaded, before any plan renamed it
    users: int = field(default=0, init=False)
    retired: bool = field(default=False, init=False)
    released: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.own = self.served


class ModelSwitcher:
    """The one owner of the models that answer new requests, one per arm; see the module
    docstring. ``@champion`` always has one; ``@candidate`` has one only while a traffic plan
    (`phi3ops.traffic`) gives it live traffic, and `plan` says how it shares it.

    While a plan is in force, every arm's model answers as the registered model (its
    `LoadedModel.served` is renamed, `ServedModel.among`) and takes a request naming any arm,
    so neither an answer nor a 404 tells a client which arm it is on; and a candidate that
    cannot stream takes no streamed request (`arm_for`).

    Args:
        first: The champion served from the start.
    """

    def __init__(self, first: LoadedModel) -> None:
        self._lock = threading.Lock()
        self._models: dict[Arm, LoadedModel] = {Arm.CHAMPION: first}
        self._plan: TrafficPlan | None = None
        self._closed = False

    @property
    def current(self) -> LoadedModel:
        """The champion: the model new requests get unless the plan sends them elsewhere."""
        with self._lock:
            return self._models[Arm.CHAMPION]

    def serving(self, arm: Arm) -> LoadedModel | None:
        """The model of ``arm``, or None when that arm takes no traffic."""
        with self._lock:
            return self._models.get(arm)

    @property
    def plan(self) -> TrafficPlan | None:
        """The traffic plan in force: None unless a candidate is loaded to follow it."""
        with self._lock:
            return self._plan if Arm.CANDIDATE in self._models else None

    def set_plan(self, plan: TrafficPlan | None) -> None:
        """Follow ``plan`` from the next request on (it applies once a candidate is loaded)."""
        with self._lock:
            self._plan = plan
            self._rename()

    def arm_for(self, user: str | None, *, stream: bool = False) -> Arm:
        """The arm that answers a new request from ``user``, under the plan in force; a
        ``stream`` that the candidate cannot answer (and the champion can) stays with the
        champion, so it is neither refused nor counted for either arm's verdict.
        """
        with self._lock:
            plan = self._plan if Arm.CANDIDATE in self._models else None
            if plan is None:
                return Arm.CHAMPION
            arm = plan.arm_for(user)
            if (
                arm is Arm.CANDIDATE
                and stream
                and not self._models[Arm.CANDIDATE].streams
                and self._models[Arm.CHAMPION].streams
            ):
                return Arm.CHAMPION
            return arm

    def _rename(self) -> None:
        """Names every arm's model as `ServedModel.among` says, for the plan in force (under
        the lock).
        """
        # Named by the plan as soon as it is known, before its candidate has loaded: the first
        # answers under a plan must not name the version either.
        in_force = self._plan is not None
        models = list(self._models.values())
        for loaded in models:
            others = [other.own for other in models if other is not loaded]
            loaded.served = loaded.own.among(others, plan=in_force)

    def acquire(self, arm: Arm = Arm.CHAMPION) -> LoadedModel:
        """The model of ``arm`` (the champion's when ``arm`` has none), counted as in use until
        `release` is called with it.
        """
        return self.acquire_arm(arm)[1]

    def acquire_arm(self, arm: Arm = Arm.CHAMPION) -> tuple[Arm, LoadedModel]:
        """(the arm that answers, its model): `acquire`, saying which arm it fell to."""
        with self._lock:
            if arm not in self._models:
                arm = Arm.CHAMPION
            loaded = self._models[arm]
            loaded.users += 1
            return arm, loaded

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
    def using(self, arm: Arm = Arm.CHAMPION) -> Iterator[LoadedModel]:
        """`acquire`, then `release` when the block ends, however it ends."""
        with self.using_arm(arm) as (_, loaded):
            yield loaded

    @contextlib.contextmanager
    def using_arm(self, arm: Arm = Arm.CHAMPION) -> Iterator[tuple[Arm, LoadedModel]]:
        """`acquire_arm`, then `release` when the block ends, however it ends."""
        taken = self.acquire_arm(arm)
        try:
            yield taken
        finally:
            self.release(taken[1])

    def switch(self, new: LoadedModel, *, arm: Arm = Arm.CHAMPION) -> LoadedModel | None:
        """Makes ``new`` the model of ``arm`` for every request that starts from now on; the
        one it replaces is released as soon as its requests in flight have finished. A model
        that serves another arm moves (a promoted candidate: no second load, no pause).

        Returns:
            The model replaced (None when ``arm`` had none; ``new`` itself, released at once,
            after `close`).
        """
        with self._lock:
            if self._closed:
                old: LoadedModel | None = new
            else:
                old = self._models.get(arm)
                for other in [a for a, m in self._models.items() if m is new and a is not arm]:
                    del self._models[other]
                self._models[arm] = new
                self._rename()
            done = old is not None and self._retire(old)
        if done and old is not None:
            _free(old)
        return old

    def remove(self, arm: Arm) -> LoadedModel | None:
        """``arm`` takes no new request (never the champion's); its model is released once its
        requests in flight have finished. Returns it, or None when the arm had none.
        """
        if arm is Arm.CHAMPION:
            raise ValueError("the champion arm always serves: switch it instead")
        with self._lock:
            old = self._models.pop(arm, None)
            self._rename()
            if old is not None:
                old.served = old.own
            done = old is not None and self._retire(old)
        if done and old is not None:
            _free(old)
        return old

    def close(self) -> None:
        """At shutdown (after the server's drain): every model is released once its requests
        have finished, and no model can be switched to any more. A request still waiting on a
        model now cannot be answered in the drain: its model ends it at once (`_unload`), so no
        thread of it keeps the process from exiting.
        """
        with self._lock:
            self._closed = True
            models = list(self._models.values())
            done = [loaded for loaded in models if self._retire(loaded, closing=True)]
        for loaded in models:
            _unload(loaded.model)
        for loaded in done:
            _free(loaded)

    def _retire(self, loaded: LoadedModel, *, closing: bool = False) -> bool:
        """Marks ``loaded`` retired unless another arm still serves it (under the lock);
        whether nothing uses it any more, so it can be freed.
        """
        if not closing and any(m is loaded for m in self._models.values()):
            return False
        loaded.retired = True
        return loaded.users == 0


def _free(loaded: LoadedModel) -> None:
    """Releases a retired model nobody uses: its own download folder goes, in a thread of its
    own, since the last request to let go of it may be on the server's event loop and a real
    model's folder takes a while to delete (`LoadedModel.removal`).
    """
    if loaded.released:
        return
    loaded.released = True
    _unload(loaded.model)  # its engine thread ends now, not after its idle time
    if loaded.folder is not None:
        loaded.removal = threading.Thread(
            target=shutil.rmtree,
            args=(loaded.folder,),
            kwargs={"ignore_errors": True},
            name="phi3ops-release",
            daemon=True,
        )
        loaded.removal.start()
    _log.info("Released version %s: its last request has finished.", loaded.version)


def _unload(model: Any) -> None:
    """Ends the calls of a loaded pyfunc whose model can (the ONNX flavor's ``close``)."""
    unwrap = getattr(model, "unwrap_python_model", None)
    try:
        python_model = unwrap() if unwrap is not None else model
    except Exception:  # a flavor without a python model (transformers): nothing to end
        return
    close = getattr(python_model, "close", None)
    if callable(close):
        close()


def alias_of(model_uri: str | None) -> tuple[str, str] | None:
    """(name, alias) of a ``models:/<name>@<alias>`` URI; None for any other (nothing to follow)."""
    match = _ALIAS_URI.fullmatch(model_uri or "")
    return (match.group(1), match.group(2)) if match else None


class AliasFollower:
    """Keeps a `ModelSwitcher` on the version ``models:/<model_name>@<alias>`` points at and,
    with ``candidate_alias``, on the model's traffic plan: while a plan is in force the
    version the plan pinned (``candidate_version``: the one that passed the gates, not whatever
    ``@<candidate_alias>`` names later) is loaded beside the champion as the candidate arm
    (`phi3ops.traffic`), and unloaded once the plan ends or the candidate becomes champion.

    Args:
        switcher: Where a new version goes once it is loaded.
        model_name: The registered model.
        alias: The alias followed (``champion``, ``candidate``).
        load: Loads the downloaded model folder of a version: ``load(version, path)``.
        download_dir: Where versions are downloaded, each into a folder of its own.
        poll_s: Seconds between looks at the registry.
        retry_s: Seconds before a version that failed to load is tried again.
        candidate_alias: The alias a plan's candidate starts as (a warning when it moves away
            from the pinned version); None: the plan is not followed.
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
        candidate_alias: str | None = None,
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
        self.candidate_alias = candidate_alias
        self._failed: dict[str, float] = {}  # version -> when it last failed (monotonic)
        self._warned: set[tuple[str, str | None]] = set()  # (plan id, alias version) warned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        """The URI followed."""
        return f"models:/{self.model_name}@{self.alias}"

    def start(self) -> AliasFollower:
        """Starts looking at the registry every ``poll_s`` seconds, in a thread of its own."""
        if self._thread is None:
            if self.candidate_alias is not None:
                # The plan's naming holds from the first request, not from the first poll.
                try:
                    self.switcher.set_plan(read_plan(self.model_name))
                except Exception as exc:  # the first poll tries again
                    _log.warning("Cannot read the traffic plan of %s (%s).", self.model_name, exc)
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
        """One look at the registry: switches when the alias moved to a version that loads,
        then (with ``candidate_alias``) brings the candidate arm in line with the plan.

        Returns:
            The version the followed alias switched to, or None when it did not change.
        """
        try:
            version = alias_version(self.model_name, self.alias)
        except Exception as exc:  # an unreachable store must not stop the serving
            _log.warning(
                "Cannot read %s from the registry (%s); still serving version %s.",
                self.uri,
                exc,
                self.switcher.current.version,
            )
            return None
        switched = self._follow(version)
        wanted = {version}
        if self.candidate_alias is not None:
            try:
                wanted.add(self._follow_plan())
            except Exception as exc:  # the champion keeps serving whatever the candidate does
                _log.warning("Cannot follow the traffic plan of %s (%s).", self.model_name, exc)
                wanted.update(self._failed)
        # A version no alias names any more is forgotten: if one comes back to it, it is tried.
        self._failed = {v: when for v, when in self._failed.items() if v in wanted}
        return switched

    def _follow(self, version: str | None) -> str | None:
        """Makes ``version`` the champion arm's (moving the candidate's model when it is that
        version); returns it when it switched.
        """
        serving = self.switcher.current.version
        if version is None or version == serving:
            return None
        candidate = self.switcher.serving(Arm.CANDIDATE)
        if candidate is not None and candidate.version == version:
            loaded: LoadedModel | None = candidate  # promoted while it served: already loaded
        else:
            _log.info(
                "%s moved from version %s to %s: loading it beside the one serving.",
                self.uri,
                serving,
                version,
            )
            loaded = self._load(version, still_serving=serving)
        if loaded is None:
            return None
        old = self.switcher.switch(loaded)
        _log.info(
            "Now serving version %s of %s (%s); version %s is released once its requests in "
            "flight have finished.",
            version,
            self.model_name,
            self.uri,
            None if old is None else old.version,
        )
        return version

    def _follow_plan(self) -> str | None:
        """Loads, replaces or unloads the candidate arm as the traffic plan and the candidate
        alias say, and hands the plan to the switcher; returns the candidate version wanted.
        """
        assert self.candidate_alias is not None
        plan = read_plan(self.model_name)
        wanted = plan.candidate_version if plan else None
        if plan is not None:
            self._check_pin(plan)
        self.switcher.set_plan(plan)  # names the arms now; routing waits for the candidate
        if wanted == self.switcher.current.version:
            wanted = None  # the candidate is the champion now: nothing to compare
        have = self.switcher.serving(Arm.CANDIDATE)
        if wanted is None:
            if have is not None:
                self.switcher.remove(Arm.CANDIDATE)
                _log.info(
                    "Version %s of %s takes no more live traffic (no traffic plan, or it is "
                    "the champion now).",
                    have.version,
                    self.model_name,
                )
        elif have is None or have.version != wanted:
            loaded = self._load(wanted, still_serving=self.switcher.current.version)
            if loaded is not None:
                self.switcher.switch(loaded, arm=Arm.CANDIDATE)
                assert plan is not None
                _log.info(
                    "Version %s of %s (the plan's candidate) now takes live traffic: %s%s.",
                    wanted,
                    self.model_name,
                    plan.mode.value,
                    f", {plan.share:.0%} of requests" if plan.share else "",
                )
                if loaded.streams is False and self.switcher.current.streams:
                    _log.warning(
                        "Version %s of %s cannot stream (transformers flavor): streamed "
                        "requests stay with the champion (version %s) during this %s, and "
                        "count for neither arm.",
                        wanted,
                        self.model_name,
                        self.switcher.current.version,
                        plan.mode.value,
                    )
        self.switcher.set_plan(plan)
        return wanted

    def _check_pin(self, plan: TrafficPlan) -> None:
        """Warns (once per plan and alias version) when ``@<candidate_alias>`` no longer
        names the plan's candidate: the pinned version keeps serving, since it is the one
        that passed the gates and the one the verdict judges; a version the alias moved to
        takes no traffic until a plan of its own starts (`phi3ops promote --live-traffic`).
        """
        assert self.candidate_alias is not None
        moved = alias_version(self.model_name, self.candidate_alias)
        key = (plan.id, moved)
        if plan.candidate_version is None or moved == plan.candidate_version:
            return
        if key in self._warned:
            return
        self._warned.add(key)
        _log.warning(
            "@%s of %s moved to version %s during a %s of version %s: still serving version %s "
            "(the version the plan pinned, which passed the gates). Version %s takes no live "
            "traffic until it is gated and a plan of its own starts (`phi3ops promote "
            "--live-traffic`); `phi3ops canary stop` ends this one.",
            self.candidate_alias,
            self.model_name,
            moved or "-",
            plan.mode.value,
            plan.candidate_version,
            plan.candidate_version,
            moved or "-",
        )

    def _load(self, version: str, *, still_serving: str | None) -> LoadedModel | None:
        """Downloads and loads ``version`` into a folder of its own; None when it cannot (the
        warning says why; it is tried again after ``retry_s`` or when the alias moves).
        """
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed < self.retry_s:
            return None
        self.download_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.download_dir))
        try:
            path = download_model(f"models:/{self.model_name}/{version}", folder)
            loaded = self.load(version, path)
        except Exception as exc:  # whatever a broken version raises, the old one keeps serving
            shutil.rmtree(folder, ignore_errors=True)
            self._failed[version] = time.monotonic()
            _log.warning(
                "Cannot serve version %s of %s: %s. Still serving version %s; version %s is "
                "tried again in %.0f s or when the alias moves.",
                version,
                self.model_name,
                exc,
                still_serving,
                version,
                self.retry_s,
            )
            return None
        loaded.folder = folder
        self._failed.pop(version, None)
        return loaded
