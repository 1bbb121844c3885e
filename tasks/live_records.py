"""Reading inference records back from the tracking store: one version's, in a time window,
optionally one arm's of a canary or shadow run.

`phi3ops serve` stores each request row as an MLflow trace tagged with the model name, version,
arm (``champion`` / ``candidate``) and shadow flag (`phi3ops.serving.records`). The monitor reads
one version's window; the online verdict (`tasks.canary`) reads one arm's, and waits while
records of its window are still in a server's spool (`unstored_records`).
"""

from __future__ import annotations

from phi3ops.names import MODEL_NAME_TAG, MODEL_VERSION_TAG, RECORD_ATTRIBUTE, RECORD_SPAN_NAME
from phi3ops.serving.records import InferenceRecord
from phi3ops.serving.spool import read_backlog
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking


def load_records(
    model_name: str,
    version: str,
    *,
    start: float,
    end: float,
    arm: str | None = None,
    shadow: bool | None = None,
) -> list[InferenceRecord]:
    """The version's inference records whose request arrived in [start, end], oldest first.

    Args:
        model_name: Registered model.
        version: Its version.
        start: Window start, seconds since the epoch.
        end: Window end, seconds since the epoch.
        arm: Only records answered by this arm (``champion`` / ``candidate``); None: any.
        shadow: Only shadow copies (True) or only answers the client saw (False); None: both.

    Returns:
        The records, sorted by arrival.
    """
    import mlflow

    configure_tracking()
    experiment = mlflow.get_experiment_by_name(get_settings().inference_experiment_name)
    if experiment is None:
        return []  # nothing was ever served from this store
    filter_string = (
        f"tag.`{MODEL_NAME_TAG}` = '{_quoted(model_name)}' "
        f"AND tag.`{MODEL_VERSION_TAG}` = '{_quoted(str(version))}' "
        f"AND trace.timestamp_ms >= {int(start * 1000)} "
        f"AND trace.timestamp_ms <= {int(end * 1000)}"
    )
    traces = mlflow.search_traces(
        locations=[experiment.experiment_id],
        filter_string=filter_string,
        return_type="list",
        flush=True,
    )
    records = []
    for trace in traces:
        for span in trace.data.spans:
            value = span.get_attribute(RECORD_ATTRIBUTE)
            if span.name == RECORD_SPAN_NAME and isinstance(value, dict):
                records.append(InferenceRecord.from_attribute(value))
    # Arm and shadow are filtered on the records, not the trace tags: a record stored before
    # traffic plans existed has no such tags, and its defaults (champion, not shadow) are right.
    records = [
        record
        for record in records
        if (arm is None or record.arm == arm) and (shadow is None or record.shadow == shadow)
    ]
    return sorted(records, key=lambda record: record.timestamp)


def unstored_records(end: float) -> str | None:
    """Why a verdict over a window ending at ``end`` must wait: records spooled by a server of
    this data dir before ``end`` and not yet in the tracking store (None: there are none).
    """
    backlog = read_backlog(get_settings().data_dir / "serving" / "spool")
    if not backlog.waiting or backlog.oldest_at is None or backlog.oldest_at > end:
        return None
    return (
        f"{backlog.waiting} inference records are still in the servers' spool (the oldest "
        f"waiting {backlog.oldest_age_s():.0f} s): judging before they are stored would leave "
        f"part of the window out"
    )


def _quoted(value: str) -> str:
    return value.replace("'", "\\'")
