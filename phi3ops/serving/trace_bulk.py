"""Writing a batch of new traces to a SQLAlchemy MLflow store in one transaction, in bulk.

MLflow's ``SqlAlchemyStore.start_trace`` is one transaction per trace, and its ``log_spans``,
though one transaction per call, still merges every trace tag one by one (a SELECT and an
INSERT each) and UPDATEs each trace info on its own. For a batch of traces that are not stored
yet, `insert_traces` writes the same rows those two calls would leave behind (MLflow 3.17.2's
own table models and helpers: the trace infos with their previews, token usage and payload
generation, the tags with the artifact-location and spans-location ones, the metadata marked
finalized, the spans as ``log_spans`` stores them, the rollup partitions to rebuild) with one
multi-row INSERT per table.

A trace stored already (written again after a crash), one twice in the batch, or one whose
spans carry what this path does not reproduce (a session id, a user id) is handed back: the
caller writes those through MLflow's own ``start_trace``/``log_spans``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Item:
    """One trace to write: its info for ``start_trace`` (None: ``log_spans`` creates it) and
    its spans.
    """

    trace_id: str
    experiment_id: str
    info: Any
    spans: list[Any] = field(default_factory=list)


def insert_traces(store: Any, items: list[Item]) -> list[Item]:
    """Insert the traces of ``items`` not stored yet, in one transaction, exactly as
    ``start_trace`` (where an item has an info) then ``log_spans`` would store them.

    Returns:
        The items left to MLflow's API: stored already, twice in the batch, or unusual.

    Raises:
        MlflowException: An unknown or deleted experiment (as ``start_trace`` raises it).
    """
    from mlflow.store.tracking import sqlalchemy_store as sql

    if not items:
        return []
    with store.ManagedSessionMaker(read_only=False) as session:
        stored = {
            request_id
            for (request_id,) in session.query(sql.SqlTraceInfo.request_id).filter(
                sql.SqlTraceInfo.request_id.in_([item.trace_id for item in items])
            )
        }
        rest, seen, experiments = [], set(stored), {}
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        partitions: list[tuple[Any, int, list[int]]] = []
        for item in items:
            if item.trace_id in seen:
                rest.append(item)
                continue
            if item.experiment_id not in experiments:
                experiment = store.get_experiment(item.experiment_id)
                store._check_experiment_is_active(experiment)
                experiments[item.experiment_id] = experiment
            written = _rows(store, experiments[item.experiment_id], item)
            if written is None:
                rest.append(item)
                continue
            seen.add(item.trace_id)
            for table, table_rows in written.items():
                rows[table].extend(table_rows)
            partitions.extend(_partitions(item, written))
        if rows:
            # Queue-first, as MLflow's writers lock the rebuild keys (a no-op unless rollups).
            sql.enqueue_rollup_rebuild_partitions(session, partitions)
            _insert(session, sql.SqlTraceInfo, rows["info"])
            _insert(session, sql.SqlTraceTag, rows["tags"])
            _insert(session, sql.SqlTraceMetadata, rows["metadata"])
            sql._bulk_upsert(session, sql.SqlSpan, rows["spans"])
    return rest


def _insert(session: Any, model: Any, rows: list[dict[str, Any]]) -> None:
    """One multi-row INSERT (in chunks a database takes) of ``rows`` into ``model``'s table."""
    from sqlalchemy import insert

    for start in range(0, len(rows), 500):
        session.execute(insert(model.__table__), rows[start : start + 500])


def _partitions(item: Item, written: dict[str, list[dict[str, Any]]]) -> list[Any]:
    """The rollup partitions ``start_trace`` and ``log_spans`` enqueue for a new trace."""
    from mlflow.store.tracking import sqlalchemy_store as sql

    experiment_id = int(item.experiment_id)
    times = [written["info"][0]["timestamp_ms"]]
    times += [span["start_time_unix_nano"] // 1_000_000 for span in written["spans"]][:1]
    return [
        (family, experiment_id, times)
        for family in (sql.RollupFamily.TRACE_METRIC, sql.RollupFamily.ASSESSMENT)
    ] + [
        (sql.RollupFamily.SPAN_COST, experiment_id, [span["start_time_unix_nano"] // 1_000_000])
        for span in written["spans"]
    ]


def _rows(store: Any, experiment: Any, item: Item) -> dict[str, list[dict[str, Any]]] | None:
    """The rows a new trace leaves in each table after ``start_trace`` (if it has an info) and
    ``log_spans`` (`SqlAlchemyStore._start_trace_once`, `_log_spans_once`), or None where its
    spans need what this path does not do.
    """
    from mlflow.store.tracking import sqlalchemy_store as sql

    trace_id, info, spans = item.trace_id, item.info, item.spans
    span_rows, usage_nodes, cost_nodes = [], [], []
    root_dict, root_status, root_tags = None, None, {}
    for span in spans:
        span_dict = sql.translate_span_when_storing(span)
        attributes = span_dict.get("attributes", {})
        usage_nodes.append(
            sql._span_aggregation_node(
                span.span_id, span.parent_id, attributes, sql.SpanAttributeKey.CHAT_USAGE
            )
        )
        cost_nodes.append(
            sql._span_aggregation_node(
                span.span_id, span.parent_id, attributes, sql.SpanAttributeKey.LLM_COST
            )
        )
        if (
            attributes.get(sql.SpanAttributeKey.SESSION_ID)
            or attributes.get(sql.GenAiSemconvKey.CONVERSATION_ID)
            or attributes.get("user.id")
            or getattr(getattr(span._span, "resource", None), "attributes", None)
        ):
            return None
        cost = {}
        if span_cost := attributes.get(sql.SpanAttributeKey.LLM_COST):
            try:
                cost = json.loads(span_cost)
            except (TypeError, ValueError):
                cost = {}
        span_rows.append(
            {
                "trace_id": span.trace_id,
                "experiment_id": int(item.experiment_id),
                "span_id": span.span_id,
                "parent_span_id": span.parent_id,
                "name": span.name,
                "type": span.span_type,
                "status": span.status.status_code,
                "start_time_unix_nano": span.start_time_ns,
                "end_time_unix_nano": span.end_time_ns,
                "content": json.dumps(
                    span_dict, cls=sql.TraceJSONEncoder, ensure_ascii=store.db_type == sql.MSSQL
                ),
                "input_cost": sql.finite_float_or_none(cost.get("input_cost")),
                "output_cost": sql.finite_float_or_none(cost.get("output_cost")),
                "total_cost": sql.finite_float_or_none(cost.get("total_cost")),
                "model_name": sql.bounded_model_dimension(
                    sql._try_parse_json_string(attributes.get(sql.SpanAttributeKey.MODEL))
                ),
                "model_provider": sql.bounded_model_dimension(
                    sql._try_parse_json_string(attributes.get(sql.SpanAttributeKey.MODEL_PROVIDER))
                ),
            }
        )
        if span.parent_id is None and root_dict is None:
            root_dict = span_dict
            root_status = (
                sql.TraceState.ERROR.value
                if span.status.status_code == sql.SpanStatusCode.ERROR
                else sql.TraceState.OK.value
            )
            root_tags = _root_tags(attributes)
    if not span_rows:
        return None
    min_start_ms = min(span.start_time_ns for span in spans) // 1_000_000
    ends = [span.end_time_ns for span in spans if span.end_time_ns is not None]
    max_end_ms = max(ends) // 1_000_000 if ends else None

    tags: dict[str, str] = {}
    metadata: dict[str, str] = {}
    row: dict[str, Any]
    if info is not None:  # start_trace
        metadata = dict(info.trace_metadata.items())
        row = {
            "timestamp_ms": info.request_time,
            "execution_time_ms": info.execution_duration,
            "status": info.state.value,
            "client_request_id": info.client_request_id,
            "request_preview": info.request_preview,
            "response_preview": info.response_preview,
            "trace_name": sql.validate_trace_name(info.tags.get(sql.TraceTagKey.TRACE_NAME)),
            **sql.analytics_columns_from_metadata(metadata),
        }
        tags = {k: v for k, v in info.tags.items() if k != sql.TraceTagKey.TRACE_NAME}
        for key in sql.PROMOTED_TRACE_METADATA_KEYS:
            metadata.pop(key, None)
        metadata[sql.TraceMetadataKey.TRACE_INFO_FINALIZED] = "true"
    else:  # log_spans creates it, then moves its time range over the spans (the same here)
        row = {
            "timestamp_ms": min_start_ms,
            "execution_time_ms": None if max_end_ms is None else max_end_ms - min_start_ms,
            "status": root_status or sql.TraceState.IN_PROGRESS.value,
            "client_request_id": None,
        }
    artifact_tag = store._get_trace_artifact_location_tag(experiment, trace_id)
    tags[artifact_tag.key] = artifact_tag.value

    # What log_spans then updates on the trace info.
    unfinished = (sql.TraceState.IN_PROGRESS.value, sql.TraceState.STATE_UNSPECIFIED.value)
    if row["status"] in unfinished and root_status:
        row["status"] = root_status
    if root_dict is not None:
        row.update(_previews(row, root_dict))
    if sql.TraceTagKey.TRACE_NAME in root_tags:
        row["trace_name"] = root_tags[sql.TraceTagKey.TRACE_NAME]
    finalized = info is not None
    for aggregate, columns, convert in (
        (
            sql.aggregate_usage_from_span_nodes(usage_nodes),
            sql.TOKEN_COLUMN_BY_KEY,
            sql.token_count_or_none,
        ),
        (
            sql.aggregate_cost_from_span_nodes(cost_nodes),
            sql.COST_COLUMN_BY_KEY,
            sql.finite_float_or_none,
        ),
    ):
        authoritative = finalized and any(row.get(c) is not None for c in columns.values())
        if aggregate and not authoritative:
            for key, column in columns.items():
                if (value := convert(aggregate.get(key))) is not None:
                    row[column] = value

    tags[sql.TraceTagKey.SPANS_LOCATION] = sql.SpansLocation.TRACKING_STORE.value
    for tag_key, tag_value in root_tags.items():
        if tag_key != sql.TraceTagKey.TRACE_NAME:
            tags[tag_key] = tag_value
    info_row: dict[str, Any] = {c.name: None for c in sql.SqlTraceInfo.__table__.columns}
    info_row.update(row, request_id=trace_id, experiment_id=int(item.experiment_id))
    info_row["db_payload_generation"] = 1  # server default 0, bumped once by log_spans
    return {
        "info": [info_row],
        "tags": [{"request_id": trace_id, "key": k, "value": v} for k, v in tags.items()],
        "metadata": [
            {"request_id": trace_id, "key": k, "value": v} for k, v in sorted(metadata.items())
        ],
        "spans": span_rows,
    }


def _previews(row: dict[str, Any], root_dict: dict[str, Any]) -> dict[str, Any]:
    """The previews ``log_spans`` fills in from the root span where the info has none."""
    from mlflow.store.tracking import sqlalchemy_store as sql

    update: dict[str, Any] = {}
    attributes = root_dict.get("attributes", {})
    try:
        if row.get("request_preview") is None and (
            inputs := attributes.get(sql.SpanAttributeKey.INPUTS)
        ):
            update["request_preview"] = sql._get_truncated_preview(inputs, role="user")
        if row.get("response_preview") is None and (
            outputs := attributes.get(sql.SpanAttributeKey.OUTPUTS)
        ):
            update["response_preview"] = sql._get_truncated_preview(outputs, role="assistant")
    except Exception:  # MLflow keeps what it had computed then, as here
        pass
    return update


def _root_tags(attributes: dict[str, Any]) -> dict[str, str]:
    """The trace tags carried as ``mlflow.traceTag.*`` attributes of the root span, validated
    as ``log_spans`` validates them (an invalid one is skipped).
    """
    from mlflow.store.tracking import sqlalchemy_store as sql

    prefix = sql.SpanAttributeKey.TRACE_TAG_PREFIX
    tags = {}
    for attr_key, attr_value in attributes.items():
        if not attr_key.startswith(prefix):
            continue
        try:
            key, value = sql._validate_trace_tag(
                attr_key[len(prefix) :], str(sql._try_parse_json_string(attr_value))
            )
            if key == sql.TraceTagKey.TRACE_NAME:
                value = sql.validate_trace_name(value)
        except Exception:  # log_spans skips an invalid tag
            continue
        tags[key] = value
    return tags
