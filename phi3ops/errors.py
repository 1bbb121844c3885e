"""Every error phi3ops raises on purpose.

Each class subclasses the nearest built-in so callers can catch it generically, and every
message says what failed *and* how to fix it. Raise with ``from`` to keep the cause.
"""

from __future__ import annotations


class Phi3OpsError(Exception):
    """Base class of every phi3ops error."""


# --- configuration and input -------------------------------------------------------------


class InvalidInputError(Phi3OpsError, ValueError):
    """A parameter or input value is malformed (the message names the field and the fix)."""


class EvalSetError(InvalidInputError):
    """An eval set file is malformed; the message lists each problem as ``file:line: reason``.

    Attributes:
        path: The eval set file, when one was read.
        problems: ``(line number or None, reason)`` for each problem found, in file order.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        problems: tuple[tuple[int | None, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.path = path
        self.problems = problems


class EvalSetNotFoundError(EvalSetError, FileNotFoundError):
    """No eval set by that name or path; the message lists the sets that do exist."""


# --- the hub (fetch stage) ---------------------------------------------------------------


class HubError(Phi3OpsError):
    """Base class of errors talking to a Hugging Face hub."""


class RepoNotFoundError(HubError, LookupError):
    """The repository does not exist on the hub (or is private and the token cannot see it)."""


class RevisionNotFoundError(HubError, LookupError):
    """The branch, tag or commit does not exist in the repository."""


class RemoteFileNotFoundError(HubError, LookupError):
    """A file the fetch needs is missing from the repository at that commit."""


class HubAccessDeniedError(HubError, PermissionError):
    """The repository is gated, or the token is missing, invalid or lacks access."""


class HubUnreachableError(HubError, ConnectionError):
    """The hub cannot be reached (offline) and nothing usable is cached locally."""


class TransientHubError(HubError, ConnectionError):
    """A hub failure worth retrying: 429, 5xx, a dropped or reset connection."""


class HubTimeoutError(HubError, TimeoutError):
    """The hub (or a host it redirected to) said nothing within ``PHI3OPS_HUB_TIMEOUT_S``.

    Not retried: a hub silent for that long is not a blip, and retries would multiply the wait.
    """


class IntegrityError(HubError, ValueError):
    """Bytes do not match their checksum: a download against the hub's listing, or a snapshot
    file against its manifest.
    """


class UnsafeModelError(Phi3OpsError, ValueError):
    """A model folder holds a file type that is not model data (a shared library, an
    executable...) or a ``genai_config.json`` setting that loads code or an execution provider
    that is not allowed. The message names the file and the key.
    """


class InsufficientDiskSpaceError(Phi3OpsError, OSError):
    """The target filesystem cannot hold what is about to be written."""


# --- model building ----------------------------------------------------------------------


class OnnxBuildError(Phi3OpsError, RuntimeError):
    """The onnxruntime-genai builder could not turn PyTorch weights into an ONNX model."""


# --- packaging and the model registry ----------------------------------------------------


class PackagingError(Phi3OpsError, RuntimeError):
    """MLflow could not log a fetched model (missing runtime package, unreadable weights...)."""


class RegistryError(Phi3OpsError, RuntimeError):
    """The MLflow model registry refused an operation (registering, tagging, aliasing)."""


class AliasLockLostError(Phi3OpsError, RuntimeError):
    """An alias change lost the model's alias lock before it finished (its lease ran out while
    the process was paused, so another holder took the lock): it stopped before its next write,
    and the other holder's change stands.
    """


class TrackingUnreachableError(Phi3OpsError, ConnectionError):
    """The MLflow tracking server did not answer within the configured timeout."""


# --- evaluation --------------------------------------------------------------------------


class EvaluationError(Phi3OpsError, RuntimeError):
    """An evaluation could not run or record its results (the model would not load, MLflow
    recorded no verdicts...). Failed requests are not this: they are recorded per item.
    """


class RegressionError(Phi3OpsError, RuntimeError):
    """A fresh re-evaluation of a version fails its gates, or is worse than its earlier one."""


class MonitoringFailedError(Phi3OpsError, RuntimeError):
    """The champion's recent inference records broke expectations of the monitoring suite."""


# --- orchestration (deployments, automations) --------------------------------------------


class OrchestrationError(Phi3OpsError, LookupError):
    """Something the pipeline's automations need is missing from the Prefect API (a deployment,
    a notification block); the message names the command that creates it.
    """
