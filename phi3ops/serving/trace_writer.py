"""Storing spool entries as MLflow traces, a batch per store transaction.

Each entry (`phi3ops.serving.records.InferenceRecorder.entry`) becomes one trace whose id is
the entry's own, so writing it again (after a crash) rewrites that trace instead of adding one.
Its root span carries the record (the ``phi3ops.record`` attribute), its inputs and outputs
(the text, or summaries when prompts are not recorded) and the tags the monitor and the canary
verdict search by; its trace info carries the logged model's id (``mlflow.modelId``) and the
previews of the summaries, which ``log_spans`` alone cannot set.

Where the time went (measured, SQLite store, 200 entries): MLflow's ``start_trace`` is one
transaction per trace (an experiment lookup, a session, a commit: about 9 ms each), which held
the writer near 55 records/s. On a SQLAlchemy store (the embedded SQLite default, or
PostgreSQL) the trace infos of a batch are now inserted in one transaction with MLflow's own
table models, exactly as ``start_trace`` writes them; other stores (a tracking server over
REST) still get one ``start_trace`` per trace. The spans then go in one ``log_spans`` call per
experiment, as before.

An entry the store can never take (no experiment id, an unknown experiment, a malformed
record) raises `RefusedEntry`: the spool then writes the batch's lines one by one and moves the
refused one to its dead-letter file (`phi3ops.serving.spool`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from phi3ops.names import (
    ARM_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    RECORD_ATTRIBUTE,
    RECORD_SPAN_NAME,
    SHADOW_TAG,
)
from phi3ops.serving.spool import Entry, RefusedEntry
from phi3ops.serving.trace_summary import request_preview, response_preview, response_summary

#: MLflow error codes that say the request itself is wrong (never worth trying again).
_REFUSAL_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}
)


def trace_id_of(entry: Entry) -> str:
    """The MLflow trace id a spool entry is stored as (the same each time it is written)."""
    return f"tr-{entry['id']}"


def write_entries(entries: list[Entry], *, tracking_uri: str | None = None) -> None:
    """Store spool entries as traces: their trace infos in one transaction (SQLAlchemy stores),
    their spans in one ``log_spans`` call per experiment. Writing an entry again rewrites its
    trace.

    Raises:
        RefusedEntry: An entry the store will never take (missing or unknown experiment, a
            malformed record); the spool isolates it.
        Exception: The store did not take the batch (it is down): the spool tries again.
    """
    from mlflow.entities import Span
    from mlflow.exceptions import MlflowException
    from mlflow.tracing.client import TracingClient

    by_experiment: dict[str, list[Span]] = defaultdict(list)
    infos = []
    try:
        for entry in entries:
            if not str(entry.get("experiment_id") or "").strip():
                raise RefusedEntry(f"entry {entry.get('id')!r} names no experiment_id")
            if entry.get("model_id") or not _prompts_recorded(entry):
                infos.append(_trace_info(entry))
            by_experiment[str(entry["experiment_id"])].append(Span.from_dict(_span_dict(entry)))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, RefusedEntry):
            raise
        raise RefusedEntry(f"a malformed inference record ({type(exc).__name__}: {exc})") from exc
    client = TracingClient(tracking_uri)
    try:
        _start_traces(client, infos)
        for experiment_id, spans in by_experiment.items():
            client.log_spans(experiment_id, spans)
    except MlflowException as exc:
        if exc.error_code in _REFUSAL_CODES:
            raise RefusedEntry(f"the tracking store refused it: {exc.message}") from exc
        raise


def _start_traces(client: Any, infos: list[Any]) -> None:
    """``start_trace`` for each info: one transaction for all on a SQLAlchemy store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    rest = infos
    if infos and isinstance(client.store, SqlAlchemyStore):
        rest = _insert_trace_infos(client.store, infos)
    for info in rest:
        client.start_trace(info)


def _insert_trace_infos(store: Any, infos: list[Any]) -> list[Any]:
    """Insert the trace infos of ``infos`` that are not stored yet, in one transaction, as
    MLflow's ``SqlAlchemyStore.start_trace`` writes one (tags, the artifact-location tag,
    metadata marked finalized, the analytics columns, the rollup partitions to rebuild).

    Returns:
        The infos whose trace exists already: ``start_trace`` merges those, one by one.
    """
    from mlflow.store.tracking import sqlalchemy_store as sql
    from mlflow.tracing.constant import TraceMetadataKey

    ids = [info.trace_id for info in infos]
    partitions: dict[int, list[int]] = defaultdict(list)
    with store.ManagedSessionMaker(read_only=False) as session:
        stored_before = {
            request_id
            for (request_id,) in session.query(sql.SqlTraceInfo.request_id).filter(
                sql.SqlTraceInfo.request_id.in_(ids)
            )
        }
        experiments: dict[str, Any] = {}
        seen = set(stored_before)
        for info in infos:
            trace_id, experiment_id = info.trace_id, str(info.experiment_id)
            if trace_id in seen:
                continue  # stored already (merged below), or twice in this batch
            seen.add(trace_id)
            if experiment_id not in experiments:
                experiment = store.get_experiment(experiment_id)
                store._check_experiment_is_active(experiment)
                experiments[experiment_id] = experiment
            metadata = dict(info.trace_metadata.items())
            row = sql.SqlTraceInfo(
                request_id=trace_id,
                experiment_id=experiment_id,
                timestamp_ms=info.request_time,
                execution_time_ms=info.execution_duration,
                status=info.state.value,
                client_request_id=None,
                request_preview=info.request_preview,
                response_preview=info.response_preview,
                **sql.analytics_columns_from_metadata(metadata),
            )
            row.tags = [
                sql.SqlTraceTag(request_id=trace_id, key=key, value=value)
                for key, value in info.tags.items()
            ] + [store._get_trace_artifact_location_tag(experiments[experiment_id], trace_id)]
            for key in sql.PROMOTED_TRACE_METADATA_KEYS:
                metadata.pop(key, None)
            metadata[TraceMetadataKey.TRACE_INFO_FINALIZED] = "true"
            row.request_metadata = [
                sql.SqlTraceMetadata(request_id=trace_id, key=key, value=value)
                for key, value in sorted(metadata.items())
            ]
            session.add(row)
            partitions[int(experiment_id)].append(info.request_time)
        sql.enqueue_rollup_rebuild_partitions(
            session,
            [
                (family, experiment_id, times)
                for experiment_id, times in partitions.items()
                for family in (sql.RollupFamily.TRACE_METRIC, sql.RollupFamily.ASSESSMENT)
            ],
        )
    return [info for info in infos if info.trace_id in stored_before]


def _trace_info(entry: Entry) -> Any:
    """The trace info of an entry: its time, state and tags, its logged model's id, and, for
    an entry without text, the previews of its summaries.
    """
    from mlflow.entities import TraceInfo, TraceLocation, TraceState
    from mlflow.tracing.constant import TraceMetadataKey

    record = entry["record"]
    served = record.get("outcome", "served") == "served"
    recorded = _prompts_recorded(entry)
    return TraceInfo(
        trace_id=trace_id_of(entry),
        trace_location=TraceLocation.from_experiment_id(str(entry["experiment_id"])),
        request_time=int(record["timestamp"] * 1000),
        execution_duration=int(float(record["latency_s"]) * 1000),
        state=TraceState.OK if served else TraceState.ERROR,
        request_preview=None if recorded else request_preview(entry.get("inputs")),
        response_preview=None if recorded else response_preview(record),
        trace_metadata=(
            {TraceMetadataKey.MODEL_ID: str(entry["model_id"])} if entry.get("model_id") else {}
        ),
        tags=_trace_tags(record),
    )


def _prompts_recorded(entry: Entry) -> bool:
    """Whether the entry holds the request and answer text (an entry spooled before this was
    stored says so by its inputs only).
    """
    if "prompts_recorded" in entry:
        return bool(entry["prompts_recorded"])
    inputs = entry.get("inputs")
    return not (isinstance(inputs, dict) and inputs.get("recorded") is False)


def _outputs(entry: Entry) -> Any:
    """The span's outputs: the answer text when recorded, else (or when there is none) what
    came of the request (`response_summary`).
    """
    record = entry["record"]
    if _prompts_recorded(entry) and record.get("response") is not None:
        return record["response"]
    return response_summary(record)


def _trace_tags(record: dict[str, Any]) -> dict[str, str]:
    """The tags the monitor and the canary verdict search traces by."""
    return {
        MODEL_NAME_TAG: record["model_name"],
        MODEL_VERSION_TAG: str(record["model_version"]),
        ARM_TAG: record.get("arm", "champion"),
        SHADOW_TAG: str(bool(record.get("shadow"))).lower(),
    }


def _span_dict(entry: Entry) -> dict[str, Any]:
    """The root span of an entry's trace, in the form ``Span.from_dict`` reads."""
    from mlflow.tracing.constant import SpanAttributeKey

    record = entry["record"]
    trace_id = trace_id_of(entry)
    start_ns = int(record["timestamp"] * 1e9)
    attributes = {
        SpanAttributeKey.REQUEST_ID: trace_id,
        SpanAttributeKey.SPAN_TYPE: "CHAT_MODEL",
        SpanAttributeKey.INPUTS: entry.get("inputs"),
        SpanAttributeKey.OUTPUTS: _outputs(entry),
        RECORD_ATTRIBUTE: record,
        **{
            f"{SpanAttributeKey.TRACE_TAG_PREFIX}{key}": value
            for key, value in _trace_tags(record).items()
        },
    }
    prompt_tokens, completion_tokens = record.get("prompt_tokens"), record.get("completion_tokens")
    if prompt_tokens is not None and completion_tokens is not None:
        attributes[SpanAttributeKey.CHAT_USAGE] = {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    failed = record.get("outcome", "served") != "served"
    return {
        "trace_id": trace_id,
        "span_id": entry["id"][:16],
        "parent_span_id": None,
        "name": RECORD_SPAN_NAME,
        "start_time_unix_nano": start_ns,
        "end_time_unix_nano": start_ns + int(float(record["latency_s"]) * 1e9),
        "status": {
            "code": "STATUS_CODE_ERROR" if failed else "STATUS_CODE_OK",
            "message": record.get("outcome", "") if failed else "",
        },
        # Span attributes are stored JSON-encoded, as MLflow's own spans store them.
        "attributes": {key: json.dumps(value, default=str) for key, value in attributes.items()},
        "events": [],
    }
