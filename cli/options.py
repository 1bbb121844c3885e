"""What every command shares: the options written once (``Annotated``), and `run_job`, which
turns a failure into one line on stderr and an exit code (2: a phi3ops error, 1: anything
else); with the global ``--verbose``, the traceback too.

Without ``--verbose`` the terminal also gets no Prefect tracebacks: a failed task or flow run
logs its exception (and its traceback) to the run's logs in the Prefect API as before, while
the console shows the run's state lines and the one-line error.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Annotated, TypeVar

import typer

from phi3ops.errors import Phi3OpsError
from phi3ops.sources import Flavor, Variant

T = TypeVar("T")

ModelNameOption = Annotated[
    str | None,
    typer.Option(help="Registered model name (default: PHI3OPS_REGISTERED_MODEL_NAME)."),
]
EvalSetOption = Annotated[
    str | None,
    typer.Option(help="Eval set name in evals/ or path of a .jsonl file (default: phi3-default)."),
]
GateOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Override a gate for this run, e.g. --gate min_pass_rate=0.7 (repeatable).",
    ),
]
ThresholdOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Override a threshold, e.g. --threshold max_error_rate=0.01 (repeatable).",
    ),
]
EvaluateChampionOption = Annotated[
    bool,
    typer.Option(help="Evaluate the champion on the eval set first when it has no evaluation."),
]
RepoIdOption = Annotated[
    str | None,
    typer.Option(help="Hub repository; defaults to the variant's Microsoft repo."),
]
RevisionOption = Annotated[str, typer.Option(help="Branch, tag or commit sha.")]
FlavorOption = Annotated[
    Flavor,
    typer.Option(help="onnx (onnxruntime-genai pyfunc) or transformers (llm/v1/chat)."),
]
VariantOption = Annotated[
    Variant | None,
    typer.Option(
        help="What to fetch; defaults to onnx-cpu-int4 for onnx (pytorch is built to ONNX "
        "int4), pytorch for transformers."
    ),
]


def prepare_prefect() -> None:
    """Environment defaults for Prefect and MLflow on a small, offline machine."""
    # Prefect's temporary local server needs 13-18 s to start here, close to its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Its telemetry write races the first migration of a fresh SQLite db ("database is locked")
    # and cannot leave an offline machine anyway.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


#: Exit code of a phi3ops error (bad input, a failed gate, nothing to roll back, ...); any other
#: exception exits 1. Commands add their own (``monitor``: 3 for too few records).
ERROR_EXIT_CODE = 2


#: The global ``--verbose`` of the command being run; `cli.app.main` sets it on every call.
_VERBOSE: ContextVar[bool] = ContextVar("phi3ops_verbose", default=False)


def set_verbose(verbose: bool) -> None:
    """Record the global ``--verbose`` (or ``PHI3OPS_VERBOSE``) for `run_job`."""
    _VERBOSE.set(verbose)


def is_verbose() -> bool:
    """Whether the global ``--verbose`` (or ``PHI3OPS_VERBOSE``) was given to this command."""
    return _VERBOSE.get()


def run_job(job: Callable[..., T], /, **kwargs: object) -> T:
    """Run a job; a failure becomes one line on stderr and an exit code, not a traceback.

    Args:
        job: What to run (a `cli.jobs` job, or a command's own function).
        **kwargs: The job's arguments.

    Raises:
        typer.Exit: The job failed: 2 for a phi3ops error, 1 for any other exception.
    """
    prepare_prefect()
    verbose = is_verbose()
    console_tracebacks(show=verbose)
    try:
        return job(**kwargs)
    except Exception as exc:
        ours = isinstance(exc, Phi3OpsError)
        code = ERROR_EXIT_CODE if ours else 1
        if verbose:
            traceback.print_exception(exc)
        # A bug (not a phi3ops error) names its type: the message alone rarely says enough.
        message = str(exc) if ours else f"{type(exc).__name__}: {exc}"
        hint = "" if verbose else "; phi3ops --verbose ... shows the traceback"
        typer.secho(f"error: {message} [exit code {code}{hint}]", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=code) from exc


#: Where Prefect's engine logs a failed run's exception (with its traceback).
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine")


class _NoEngineExceptions(logging.Filter):
    """Drops the records in which Prefect's engine reports a run's exception.

    Each is followed by the run's "Finished in state Failed(...)" line, which names the error,
    and the command ends with the same error as one line: the console loses nothing. Only the
    console handler gets this filter; the API handler still sends them to the run's logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.name.startswith(_ENGINE_LOGGERS))


class _WithoutTraceback(logging.Formatter):
    """Formats with the handler's own formatter, minus the traceback and stack.

    It formats a copy: the record itself (and its cached ``exc_text``) is shared with the other
    handlers, the Prefect API one among them, which must keep the traceback.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        copy = logging.makeLogRecord(record.__dict__)
        copy.exc_info, copy.exc_text, copy.stack_info = None, None, None
        return self.inner.format(copy)


def console_tracebacks(*, show: bool) -> None:
    """Whether the terminal's log handler (Prefect's console handler on the root logger, once
    Prefect is imported) prints tracebacks; the run logs in the Prefect API keep them anyway.

    Undone by ``show=True``, so that one process running several commands (tests) gets each
    command's own ``--verbose``.
    """
    if "prefect" not in sys.modules:  # `serve`: no flow runs here, nothing to quiet
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if not isinstance(handler, PrefectConsoleHandler):
            continue
        for quiet in [f for f in handler.filters if isinstance(f, _NoEngineExceptions)]:
            handler.removeFilter(quiet)
        if isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(handler.formatter.inner)
        if not show:
            handler.addFilter(_NoEngineExceptions())
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
