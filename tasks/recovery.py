"""What a crashed or failed step leaves in the tracking store, and how the next run deals with it.

* A run still RUNNING whose process is gone (its ``phi3ops.owner`` is ``host:pid`` of this
  host, and that pid has ended) is an orphan: `end_orphan_runs` ends it as FAILED and discards
  the logged models it started. A run of a live process, or of another host, is left alone.
* A logged model that failed (or whose package failed after it) is discarded: marked FAILED,
  its artifacts (a copy of the weights) deleted, and the logged model deleted.
* A logged model that finished in a finished run but was never registered (the process died
  between logging and registering) is reused by the next packaging of the same package key
  (`reusable_logged_model`) instead of copying the weights again.
"""

from __future__ import annotations

import logging
from typing import Any

from phi3ops import registry
from phi3ops.crash import owner, owner_is_gone
from phi3ops.names import OWNER_TAG, LineageTag

__all__ = [
    "discard_logged_model",
    "discard_run_models",
    "end_orphan_runs",
    "owner_tags",
    "reusable_logged_model",
]

logger = logging.getLogger(__name__)


def owner_tags() -> dict[str, str]:
    """The tag that records which process started a run."""
    return {OWNER_TAG: owner()}


def end_orphan_runs(experiment_id: str, filter_string: str) -> list[str]:
    """End as FAILED every RUNNING run matching ``filter_string`` whose process is gone.

    Their logged models are discarded too (`discard_run_models`).

    Returns:
        The ids of the runs ended.
    """
    client = registry.client()
    running = client.search_runs(
        [experiment_id], filter_string=f"{filter_string} AND attributes.status = 'RUNNING'"
    )
    ended = []
    for run in running:
        recorded = run.data.tags.get(OWNER_TAG)
        if not owner_is_gone(recorded):
            continue
        logger.warning(
            "Run %s (%s) is still RUNNING but its process %s is gone: ending it as FAILED",
            run.info.run_id,
            run.info.run_name,
            recorded,
        )
        discard_run_models(experiment_id, run.info.run_id)
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


def discard_run_models(experiment_id: str, run_id: str) -> None:
    """Discard every logged model ``run_id`` started (`discard_logged_model`)."""
    client = registry.client()
    for model in client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        discard_logged_model(model.model_id)


def discard_logged_model(model_id: str) -> None:
    """Mark a logged model FAILED, delete its artifacts, then the logged model; best effort
    (a store that refuses is logged, not raised: this runs while handling another failure).
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = registry.client()
    try:
        model = client.get_logged_model(model_id)
        if str(model.status) != "FAILED":
            client.finalize_logged_model(model_id, "FAILED")
        get_artifact_repository(model.artifact_location).delete_artifacts()
        client.delete_logged_model(model_id)
    except Exception:
        logger.warning("Could not discard the logged model %s", model_id, exc_info=True)
        return
    logger.info("Discarded the logged model %s and its artifacts", model_id)


def reusable_logged_model(experiment_id: str, package_key: str) -> Any | None:
    """A finished, unregistered-here logged model holding ``package_key``, if one exists.

    Orphan runs of the same package key are ended first (`end_orphan_runs`).

    Returns:
        The oldest READY logged model of the key whose run FINISHED; None if there is none.
    """
    key = LineageTag.PACKAGE_KEY.value
    end_orphan_runs(experiment_id, f"tags.`{key}` = '{package_key}'")
    client = registry.client()
    models = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{key}` = '{package_key}'"
    )
    for model in sorted(models, key=lambda m: m.creation_timestamp):
        if str(model.status) != "READY" or not model.source_run_id:
            continue
        if client.get_run(model.source_run_id).info.status == "FINISHED":
            return model
    return None
