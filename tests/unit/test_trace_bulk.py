"""The writer's bulk path stores exactly what MLflow's own ``start_trace``/``log_spans`` store.

The same spool entries go into two fresh SQLite stores: one through `write_entries` (new
traces in one transaction, multi-row INSERTs: `phi3ops.serving.trace_bulk`), one through
MLflow's public API only. Every row of the trace tables, and the traces read back through
``MlflowClient`` (the UI's trace list query included), must be the same.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from phi3ops.serving import trace_writer
from phi3ops.serving.records import InferenceRecorder, trace_id_of, write_entries

CHAT = {"messages": [{"role": "user", "content": "Bonjour, ça va? " * 40}], "max_tokens": 4}
ANSWER = {
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Très bien <|end|>"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 3},
}
TABLES = {
    "trace_info": "request_id",
    "trace_tags": "request_id, key",
    "trace_request_metadata": "request_id, key",
    "spans": "trace_id, span_id",
}


def _entries(experiment_id: str) -> list[dict[str, Any]]:
    """Entries of every shape the server spools: text or summaries, with a logged model or
    without, served or failed, champion or shadow candidate.
    """
    entries = []
    started = time.time() - 60
    for record_prompts in (True, False):
        for model_id in ("m-123abc", None):
            recorder = InferenceRecorder(
                model_name="m",
                model_version="7",
                experiment_id=experiment_id,
                model_id=model_id,
                record_prompts=record_prompts,
            )
            for status_code, body, arm, shadow in (
                (200, {"predictions": [ANSWER, ANSWER]}, "champion", False),
                (500, {"error": "the model failed"}, "candidate", True),
            ):
                pairs = recorder.records_for(
                    {"inputs": [CHAT, CHAT]},
                    status_code=status_code,
                    body=body,
                    started=started,
                    latency_s=0.25,
                    arm=arm,
                    shadow=shadow,
                )
                entries += [recorder.entry(record, request=row) for record, row in pairs]
                started += 1.5
    return entries


def _store(tmp_path: Path, name: str) -> tuple[str, str]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / name}.db"
    experiment_id = MlflowClient(uri).create_experiment(
        "phi3ops-inference", artifact_location=str(tmp_path / "artifacts")
    )
    return uri, experiment_id


def _rows(uri: str) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in TABLES.items()
        }


@pytest.fixture
def both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, list[dict]]:
    """The same entries written in bulk into one store, through MLflow's API into another."""
    bulk_uri, experiment_id = _store(tmp_path, "bulk")
    api_uri, api_experiment_id = _store(tmp_path, "api")
    assert experiment_id == api_experiment_id
    entries = _entries(experiment_id)
    write_entries(entries, tracking_uri=bulk_uri)
    with monkeypatch.context() as patch:
        patch.setattr(trace_writer, "insert_traces", lambda store, items: items)
        write_entries(entries, tracking_uri=api_uri)
    return bulk_uri, api_uri, entries


def test_the_bulk_path_stores_the_rows_mlflows_api_stores(both) -> None:
    bulk_uri, api_uri, entries = both
    bulk, api = _rows(bulk_uri), _rows(api_uri)
    assert len(bulk["trace_info"]) == len(entries) == 16
    assert len(bulk["spans"]) == len(entries)
    for table in TABLES:
        assert bulk[table] == api[table], table


def test_the_traces_read_back_the_same_and_in_the_ui_list(both) -> None:
    from mlflow import MlflowClient

    bulk_uri, api_uri, entries = both
    bulk, api = MlflowClient(bulk_uri), MlflowClient(api_uri)
    experiment_id = entries[0]["experiment_id"]
    # The UI's trace list: search_traces over the experiment.
    listed = bulk.search_traces(locations=[experiment_id], max_results=100)
    assert {trace.info.trace_id for trace in listed} == {trace_id_of(e) for e in entries}
    api_listed = {t.info.trace_id: t for t in api.search_traces(locations=[experiment_id])}
    for trace in listed:
        assert trace.to_dict() == api_listed[trace.info.trace_id].to_dict()
    for entry in entries:
        mine, theirs = bulk.get_trace(trace_id_of(entry)), api.get_trace(trace_id_of(entry))
        assert mine.to_dict() == theirs.to_dict()
    served = bulk.get_trace(trace_id_of(entries[0])).info
    assert served.token_usage == {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
    assert served.request_preview and served.response_preview
    assert served.tags["phi3ops.arm"] == "champion"
    assert served.trace_metadata["mlflow.modelId"] == "m-123abc"


def test_a_batch_written_again_is_rewritten_through_mlflows_api(both, monkeypatch) -> None:
    """A crash re-write (the traces exist) goes through ``start_trace``/``log_spans``: the
    rows stay those MLflow's API leaves after writing the batch twice.
    """
    bulk_uri, api_uri, entries = both
    write_entries(entries, tracking_uri=bulk_uri)
    write_entries(entries, tracking_uri=api_uri)
    bulk, api = _rows(bulk_uri), _rows(api_uri)
    assert len(bulk["trace_info"]) == len(entries)
    for table in TABLES:
        assert bulk[table] == api[table], table
