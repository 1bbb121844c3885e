"""Storing spool entries as MLflow traces, a batch per store transaction.

Each entry (`phi3ops.serving.records.InferenceRecorder.entry`) becomes one trace whose id is
the entry's own, so writing it again (after a crash) rewrites that trace instead of adding one.
Its root span carries the record (the ``phi3ops.record`` attribute), its inputs and outputs
(the text, or summaries when prompts are not recorded) and the tags the monitor and the canary
verdict search by; its trace info carries the logged model's id (``mlflow.modelId``) and the
previews of the summaries, which ``log_spans`` alone cannot set.

Where the time went (measured, SQLite store): MLflow's ``start_trace`` is one transaction per
trace (about 9 ms each), which held the writer near 55 records/s; with the trace infos of a
batch in one transaction, ``log_spans`` (a merge per trace tag, an UPDATE per trace) still held
it near 110 records/s, below the server's requests/s. On a SQLAlchemy store (the embedded
SQLite default, or PostgreSQL) a batch's new traces are now written in one transaction with
one multi-row INSERT per table, MLflow's own table models and helpers producing the rows
``start_trace`` and ``log_spans`` would (`phi3ops.serving.trace_bulk`); a trace stored already
(a crash re-write) and other stores (a tracking server over REST) keep MLflow's public API.

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
from phi3ops.serving.trace_bulk import Item, insert_traces
from phi3ops.serving.trace_summary import request_preview, response_preview, response_summary

#: MLflow error codes that say the request itself is wrong (never worth trying again).
_REFUSAL_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST", "INVALID_STATE"}
)


def trace_id_of(entry: Entry) -> str:
    """The MLflow trace id a spool entry is stored as (the same each time it is written)."""
    return f"tr-{entry['id']}"


def write_entries(entries: list[Entry], *, tracking_uri: str | None = None) -> None:
    """Store spool entries as traces: on a SQLAlchemy store the new ones in one transaction
    with multi-row INSERTs (`phi3ops.serving.trace_bulk`), the rest (a REST store, traces
    stored already) through ``start_trace`` and one ``log_spans`` call per experiment. Writing
    an entry again rewrites its trace.

    Raises:
        RefusedEntry: An entry the store will never take (missing or unknown experiment, a
            malformed record); the spool isolates it.
        Exception: The store did not take the batch (it is down): the spool tries again.
    """
    from mlflow.entities import Span
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracing.client import TracingClient

    items: list[Item] = []
    try:
        for entry in entries:
            if not str(entry.get("experiment_id") or "").strip():
                raise RefusedEntry(f"entry {entry.get('id')!r} names no experiment_id")
            info = None
            if entry.get("model_id") or not _prompts_recorded(entry):
                info = _trace_info(entry)
            span = Span.from_dict(_span_dict(entry))
            items.append(Item(trace_id_of(entry), str(entry["experiment_id"]), info, [span]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, RefusedEntry):
            raise
        raise RefusedEntry(f"a malformed inference record ({type(exc).__name__}: {exc})") from exc
    client = TracingClient(tracking_uri)
    try:
        if isinstance(client.store, SqlAlchemyStore):
            items = insert_traces(client.store, items)
        _write_through_api(client, items)
    except MlflowException as exc:
        if exc.error_code in _REFUSAL_CODES:
            raise RefusedEntry(f"the tracking store refused it: {exc.message}") from exc
        raise


def _write_through_api(client: Any, items: list[Item]) -> None:
    """MLflow's public API: ``start_trace`` for each item with an info, then one ``log_spans``
    call per experiment (a REST store, or traces stored already, which this merges into).
    """
    by_experiment: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        if item.info is not None:
            client.start_trace(item.info)
        by_experiment[item.experiment_id].extend(item.spans)
    for experiment_id, spans in by_experiment.items():
        client.log_spans(experiment_id, spans)


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
