"""Progress where work is long: a terminal bar and a Prefect progress artifact.

* `terminal_bar`: a tqdm bar on stderr, shown only when stderr is a terminal and
  ``PHI3OPS_PROGRESS`` is not 0 (a log file or CI output never fills with bar redraws).
* `hub_bar_class`: what huggingface_hub's per-file download bars are drawn with, so that
  ``PHI3OPS_PROGRESS=0`` silences them too (``HF_HUB_DISABLE_PROGRESS_BARS=1`` does on its own).
* `RunProgress`: a Prefect progress artifact (0 to 100 %, the Artifacts tab of a flow run) kept
  current as work advances; outside a flow or task run (a plain function call) it does nothing,
  and a failing Prefect API never fails the work it reports on.
"""

from __future__ import annotations

import logging
import sys
from typing import Any
from uuid import UUID

from tqdm import tqdm

from phi3ops.settings import get_settings

logger = logging.getLogger(__name__)

__all__ = ["RunProgress", "bars_enabled", "hub_bar_class", "terminal_bar"]


def bars_enabled() -> bool:
    """Whether terminal progress bars are drawn: ``PHI3OPS_PROGRESS`` on and stderr a terminal."""
    if not get_settings().progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def terminal_bar(*, total: int, desc: str, unit: str = "it", unit_scale: bool = False) -> tqdm:
    """A tqdm bar on stderr, disabled (drawing nothing) unless `bars_enabled`.

    Args:
        total: Units of work.
        desc: What the bar counts, before it.
        unit: The unit's name (``"item"``, ``"file"``, ``"B"``).
        unit_scale: Show ``k``/``M`` prefixes (for bytes).

    Returns:
        The bar; close it (or use it as a context manager) when the work ends.
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=not bars_enabled(),
        file=sys.stderr,
        leave=True,
        dynamic_ncols=True,
    )


class _SilentBar(tqdm):
    """A tqdm that never draws, for huggingface_hub's per-file bars when progress is off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def hub_bar_class() -> type[tqdm] | None:
    """The ``tqdm_class`` for ``hf_hub_download``: None (huggingface_hub's own bars, which
    follow ``HF_HUB_DISABLE_PROGRESS_BARS`` and draw only on a terminal) unless
    ``PHI3OPS_PROGRESS`` is 0, then a bar that never draws.
    """
    return None if get_settings().progress else _SilentBar


class RunProgress:
    """A Prefect progress artifact of the current flow or task run, 0 to 100 %.

    Created at 0 % by `start`; `update` moves it (only when the whole percent changes, so a
    long loop makes at most ~100 API calls); `finish` sets 100 %. Outside a Prefect run every
    call is a no-op; an API error is logged at DEBUG and turns the reporter off.

    Args:
        key: The artifact key (lowercase letters, digits, dashes): the newest artifact with
            it is the current progress in the UI's Artifacts page.
        description: Markdown shown with the bar; `update` may replace it.
    """

    def __init__(self, key: str, description: str) -> None:
        self.key = key
        self.description = description
        self.artifact_id: UUID | None = None
        self._percent = -1

    def start(self) -> RunProgress:
        """Creates the artifact at 0 % when inside a flow or task run."""
        if not _in_prefect_run():
            return self
        from prefect.artifacts import create_progress_artifact

        try:
            created = create_progress_artifact(
                progress=0.0, key=self.key, description=self.description
            )
        except Exception:
            logger.debug("Could not create progress artifact %s", self.key, exc_info=True)
            return self
        if isinstance(created, UUID):
            self.artifact_id, self._percent = created, 0
        else:  # a coroutine: called from async code, which this reporter is not for
            _close(created)
        return self

    def update(self, done: int, total: int, *, description: str | None = None) -> None:
        """Sets the progress to ``done / total`` (100 % when ``total`` is 0).

        Args:
            done: Units finished.
            total: Units in all.
            description: New markdown for the artifact, if any.
        """
        if self.artifact_id is None:
            return
        percent = 100 if total <= 0 else max(0, min(100, int(100 * done / total)))
        if percent == self._percent and (description is None or percent != 100):
            return  # a new description alone is worth an API call at the end only
        from prefect.artifacts import update_progress_artifact

        try:
            _close(
                update_progress_artifact(
                    artifact_id=self.artifact_id, progress=float(percent), description=description
                )
            )
            self._percent = percent
        except Exception:
            logger.debug("Could not update progress artifact %s", self.key, exc_info=True)
            self.artifact_id = None

    def finish(self, *, description: str | None = None) -> None:
        """Sets the progress to 100 %."""
        self.update(1, 1, description=description)


def _close(result: object) -> None:
    """Closes a coroutine a Prefect call returned instead of running (an async caller)."""
    close = getattr(result, "close", None)
    if callable(close):
        close()


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
