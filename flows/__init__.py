"""Orchestration: one Prefect flow per pipeline stage, and `flows.lifecycle` chaining them.

Importing this package (every flow entrypoint does, on a worker too) routes the project's own
loggers into the Prefect run logs: see `route_project_logs`.
"""

from __future__ import annotations

import logging

#: The project's top-level packages whose ``logging.getLogger(__name__)`` lines belong in the
#: run logs (the Prefect UI), not only in the terminal.
PROJECT_LOGGERS = ("phi3ops", "tasks", "flows")


def route_project_logs(names: tuple[str, ...] = PROJECT_LOGGERS) -> None:
    """Send the INFO (and up) lines of ``names`` to the current flow or task run's logs.

    What ``PREFECT_LOGGING_EXTRA_LOGGERS`` does, done here because Prefect reads that setting
    once, when ``import prefect`` configures logging: on a worker (``python -m prefect.engine``)
    that happens before any project code runs, so setting it from the project is too late. Each
    logger gets Prefect's API log handler and the level of Prefect's ``prefect.extra`` logger
    (``PREFECT_LOGGING_LEVEL``) unless it has a level of its own. The lines still reach the
    terminal through the root logger. Idempotent, and a no-op for a logger that already has an
    API handler (``PREFECT_LOGGING_EXTRA_LOGGERS`` set by the user).
    """
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import APILogHandler

    ensure_logging_setup()
    level = logging.getLogger("prefect.extra").level or logging.INFO
    handler = _handler()
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            logger.addHandler(handler)


def _handler() -> logging.Handler:
    """Prefect's API log handler, quiet outside a run.

    A line logged outside any flow or task run (a CLI check before the flow starts, a unit
    test) has no run to go to; Prefect's own handler would warn about each one.
    """
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            in_run = FlowRunContext.get() or TaskRunContext.get()
            if in_run or getattr(record, "flow_run_id", None):
                super().emit(record)

    return RunLogHandler()


route_project_logs()
