"""One alias change at a time per registered model: the lock every promotion and rollback takes.

Two kinds, chosen by ``PHI3OPS_ALIAS_LOCK`` (default ``auto``):

* ``prefect``: a strict Prefect global concurrency limit of one slot per model
  (``phi3ops-aliases-<model>``, `phi3ops.names.alias_limit_name`). Every worker and every CLI
  that talks to the same Prefect server shares it, whatever host it runs on. The slot is a
  lease the holder renews; a holder killed outright frees it when the lease runs out
  (`LEASE_S`). A missing limit is an error naming ``phi3ops setup``, never a silent pass: a lock
  that does not lock would let two hosts move ``@champion`` at once.
* ``file``: a lock file under the data dir. It serialises everything that shares this machine,
  and is the only lock Prefect's temporary server (``PREFECT_API_URL`` unset) can offer, since
  that server lives and dies with one process.

``auto`` is ``prefect`` exactly when a Prefect server is configured (``PREFECT_API_URL``, from
the environment or the active profile), else ``file``.

Either way the caller re-reads the aliases once it holds the lock (`tasks.promotion`): the lock
orders the changes, the re-read makes a decision taken against an older champion *stale*.

**The fence.** A Prefect slot is a lease: a holder paused past it (SIGSTOP, a frozen VM, a long
GC) loses the slot to the next process, and wakes believing it still holds the lock. So every
acquisition, of either kind, takes a *fencing token*: the registered model's
``phi3ops.lock_token`` tag (`phi3ops.names.LOCK_TOKEN_TAG`) becomes ``<n+1> <holder>``, and
`promotion_lock` yields an `AliasFence` holding it. The holder calls `AliasFence.check` right
before each registry write; once another holder has taken the lock, the tag is no longer this
holder's and the check raises `AliasLockLostError` (nothing more is written; the other holder
finished or superseded this change). The file lock cannot lapse while its process lives; the
same check costs one registry read and keeps one mechanism for both kinds. MLflow cannot refuse
a write by token, so a holder paused between a check and its write can still land that one
write: the fence narrows the window from the whole change to one registry call.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from filelock import FileLock

from phi3ops import registry
from phi3ops.crash import owner
from phi3ops.errors import AliasLockLostError, OrchestrationError
from phi3ops.names import LOCK_TOKEN_TAG, alias_limit_name
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking

__all__ = ["LEASE_S", "AliasFence", "alias_lock_kind", "check_alias_lock", "promotion_lock"]

logger = logging.getLogger(__name__)

#: Seconds a holder's slot outlives the holder if it dies without releasing it (Prefect's
#: shortest lease; the live holder renews it). An alias change takes seconds.
LEASE_S = 60.0


def alias_lock_kind() -> Literal["file", "prefect"]:
    """Which lock serialises alias moves here: ``PHI3OPS_ALIAS_LOCK``, with ``auto`` resolved."""
    kind = get_settings().alias_lock
    if kind != "auto":
        return kind
    from prefect.settings import PREFECT_API_URL

    # Unset: every process would get a temporary server of its own, so a limit there would
    # serialise nothing; the file lock is the one that holds on this machine.
    return "prefect" if PREFECT_API_URL.value() else "file"


@dataclass(frozen=True)
class AliasFence:
    """This holder's fencing token for the alias lock of one model (see the module docstring).

    Attributes:
        model_name: The registered model.
        token: The ``phi3ops.lock_token`` value this acquisition wrote; None when the registered
            model did not exist then (the check then asks that no holder has taken one since).
        lock: Which lock was held, in words, for the error message.
    """

    model_name: str
    token: str | None
    lock: str

    def check(self, step: str) -> None:
        """Call right before a registry write: raise if another holder took the lock since.

        Args:
            step: The write about to happen, in words (``move the aliases``), for the message.

        Raises:
            AliasLockLostError: The model's lock token is no longer this holder's.
        """
        current = _read_token(self.model_name)
        if current == self.token:
            return
        raise AliasLockLostError(
            f"The alias lock of {self.model_name} ({self.lock}) was lost before this process "
            f"could {step}: another holder took it (fencing token now {current!r}, this "
            f"holder's {self.token!r}), most likely because this process was paused past the "
            f"lock's {LEASE_S:.0f} s lease. Nothing more was written by this process, and the "
            f"other holder's change stands (it also finishes any change this one left half "
            f"done). Check `phi3ops status`, then run the command again: it decides against the "
            f"aliases as they are now."
        )


@contextlib.contextmanager
def promotion_lock(model_name: str, *, timeout: float = 120.0) -> Iterator[AliasFence]:
    """Hold the alias lock of ``model_name`` (see the module docstring for which one).

    Yields the holder's `AliasFence`: call its ``check`` before each registry write.

    Args:
        model_name: The registered model whose aliases are about to change.
        timeout: Seconds to wait for the lock before failing.

    Raises:
        OrchestrationError: The Prefect limit does not exist (or the server refused the slot);
            the message names ``phi3ops setup``.
        TimeoutError: Another alias change held the lock for longer than ``timeout``.
    """
    started = time.monotonic()
    if alias_lock_kind() == "prefect":
        with _prefect_slot(model_name, timeout=timeout):
            lock = f"the Prefect global concurrency limit {alias_limit_name(model_name)}"
            _report(lock, started)
            configure_tracking()
            yield AliasFence(model_name, _take_token(model_name), lock)
        return
    locks = get_settings().data_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"promote-{model_name}.lock"
    with FileLock(path, timeout=timeout):
        lock = f"the lock file {path}"
        _report(lock, started)
        configure_tracking()
        yield AliasFence(model_name, _take_token(model_name), lock)


def check_alias_lock(model_name: str) -> None:
    """Fail now, not at the end of a long run, when the alias lock could not be taken: with the
    Prefect lock, the limit must exist on the server, with one slot. A no-op for the file lock.

    Raises:
        OrchestrationError: The limit is missing or allows more than one holder.
    """
    if alias_lock_kind() != "prefect":
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = alias_limit_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise OrchestrationError(_missing(model_name)) from None
    if limit.limit != 1 or not limit.active:
        raise OrchestrationError(
            f"The Prefect global concurrency limit {name} must be active with one slot (it has "
            f"{limit.limit}, active={limit.active}), or two hosts could move the aliases of "
            f"{model_name} at once. Run `phi3ops setup --model-name {model_name}` to fix it."
        )


@contextlib.contextmanager
def _prefect_slot(model_name: str, *, timeout: float) -> Iterator[None]:
    """The model's one slot, as a lease; only the acquisition's errors are translated."""
    # What `concurrency` raises for a missing limit (strict) or a refused request; Prefect
    # exports it from no public module.
    from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    slot = concurrency(
        alias_limit_name(model_name),
        occupy=1,
        timeout_seconds=timeout,
        lease_duration=LEASE_S,
        strict=True,
    )
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(slot)
        except ConcurrencySlotAcquisitionError as exc:
            raise OrchestrationError(f"{_missing(model_name)} ({exc})") from exc
        yield


def _read_token(model_name: str) -> str | None:
    """The model's current fencing token; None when the model or the tag does not exist (any
    other registry error is raised: a store that does not answer is not a lost lock).
    """
    model = _registered_model(model_name)
    return None if model is None else (model.tags or {}).get(LOCK_TOKEN_TAG)


def _take_token(model_name: str) -> str | None:
    """Write this acquisition's fencing token, one more than the last (its holder named, so two
    holders never share one); None when the registered model does not exist yet.
    """
    model = _registered_model(model_name)
    if model is None:
        return None  # nothing to fence yet; the check asks that it stays so
    last = (model.tags or {}).get(LOCK_TOKEN_TAG, "")
    number = last.split(" ", 1)[0]
    token = f"{int(number) + 1 if number.isdigit() else 1} {owner()}:{uuid.uuid4().hex[:8]}"
    registry.client().set_registered_model_tag(model_name, LOCK_TOKEN_TAG, token)
    return token


def _registered_model(model_name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return registry.client().get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _report(lock: str, started: float) -> None:
    """Say in the run's log which lock an alias move holds, and how long it waited for it: an
    operator reading a slow promotion sees whether another one held the model's aliases.
    """
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    message = f"Holding {lock} (waited {time.monotonic() - started:.1f} s)"
    try:
        get_run_logger().info(message)
    except MissingContextError:  # outside a flow or task run: the plain logger
        logger.info(message)


def _missing(model_name: str) -> str:
    from prefect.settings import PREFECT_API_URL

    name = alias_limit_name(model_name)
    return (
        f"Alias moves of {model_name} run under the Prefect global concurrency limit {name}, "
        f"which the Prefect server at {PREFECT_API_URL.value()} does not have. Create it once "
        f"per server with `phi3ops setup --model-name {model_name}` (or `prefect "
        f"global-concurrency-limit create {name} --limit 1`); to use the single-machine file "
        f"lock instead, set PHI3OPS_ALIAS_LOCK=file."
    )
