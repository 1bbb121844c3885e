"""Inference records: one MLflow trace per served request row, for both flavors.

The serving layer (`phi3ops.serving.app`) sees every request and every answer, failed ones
included, whatever the flavor, so it is where records are made. A record is a trace whose root
span carries the request (the prompt only when ``PHI3OPS_RECORD_PROMPTS`` is on), the response
text, and the record fields as one ``phi3ops.record`` attribute; the trace is tagged with the
model name and version so the monitor finds a version's records with ``mlflow.search_traces``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from phi3ops.names import MODEL_NAME_TAG, MODEL_VERSION_TAG, RECORD_ATTRIBUTE, RECORD_SPAN_NAME

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceRecord:
    """What one prediction did. Token counts and finish reason are None when the answer does
    not carry them (a prompt-shaped request answered with a bare string, or an error).
    """

    timestamp: float  # when the request arrived, seconds since the epoch
    model_name: str
    model_version: str
    latency_s: float  # wall time of the HTTP call the row was part of
    response: str | None
    error: str | None = None
    status_code: int = 200
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    context_tokens: int | None = None  # the served model's context window
    ttft_s: float | None = None  # time to first token, for streamed answers
    batch_size: int = 1
    prompt: str | None = None  # only when prompts are recorded

    @classmethod
    def from_attribute(cls, value: dict[str, Any]) -> InferenceRecord:
        """The record stored by `InferenceRecorder.record` (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


class InferenceRecorder:
    """Writes inference records of one model version to an MLflow experiment as traces."""

    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        experiment_id: str,
        record_prompts: bool = False,
        context_tokens: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = str(model_version)
        self.experiment_id = experiment_id
        self.record_prompts = record_prompts
        self.context_tokens = context_tokens

    def record(self, record: InferenceRecord, *, request: Any = None) -> str:
        """Log ``record`` as a trace; ``request`` is stored only when prompts are recorded."""
        import mlflow

        start_ns = int(record.timestamp * 1e9)
        stored = asdict(record)
        if not self.record_prompts:
            stored["prompt"] = None
        span = mlflow.start_span_no_context(
            name=RECORD_SPAN_NAME,
            span_type="CHAT_MODEL",
            inputs=request if self.record_prompts else {"recorded": False},
            # MLflow annotates dict[str, str], but passes them to Span.set_attributes, which
            # takes any JSON-serialisable value.
            attributes={RECORD_ATTRIBUTE: stored},  # type: ignore[dict-item]
            tags={MODEL_NAME_TAG: record.model_name, MODEL_VERSION_TAG: record.model_version},
            experiment_id=self.experiment_id,
            start_time_ns=start_ns,
        )
        span.end(
            outputs=record.response,
            status="ERROR" if record.error else "OK",
            end_time_ns=start_ns + int(record.latency_s * 1e9),
        )
        return span.trace_id

    def records_for(
        self,
        payload: Any,
        *,
        status_code: int,
        body: Any,
        started: float,
        latency_s: float,
        ttft_s: float | None = None,
        rows: list[Any] | None = None,
    ) -> list[tuple[InferenceRecord, Any]]:
        """Pair each request row of an HTTP exchange with its answer (or the call's error);
        ``rows`` are ``request_rows(payload)`` when the caller has them already.
        """
        rows = request_rows(payload) if rows is None else rows
        if not rows:
            rows = [payload]  # malformed: still one record, of the error the server answered
        answers = _answers(body, len(rows)) if status_code < 400 else [None] * len(rows)
        error = None if status_code < 400 else _error_message(body, status_code)
        out = []
        for row, answer in zip(rows, answers, strict=True):
            text, finish, usage = _answer_fields(answer)
            prompt_text = _prompt_text(row) if self.record_prompts else None
            row_error = error
            if row_error is None and answer is None:
                row_error = "the server answered without a prediction for this row"
            record = InferenceRecord(
                timestamp=started,
                model_name=self.model_name,
                model_version=self.model_version,
                latency_s=latency_s,
                response=text,
                error=row_error,
                status_code=status_code,
                finish_reason=finish,
                prompt_tokens=_int(usage.get("prompt_tokens")),
                completion_tokens=_int(usage.get("completion_tokens")),
                context_tokens=self.context_tokens,
                ttft_s=ttft_s,
                batch_size=len(rows),
                prompt=prompt_text,
            )
            out.append((record, row))
        return out

    def record_exchange(self, payload: Any, **exchange: Any) -> int:
        """Record every row of one HTTP exchange (`records_for`'s arguments); never raises:
        serving must not fail because the tracking store does.
        """
        written = 0
        try:
            for record, row in self.records_for(payload, **exchange):
                self.record(record, request=row)
                written += 1
        except Exception:
            _log.exception("Could not write inference records to MLflow")
        return written


def request_rows(payload: Any) -> list[Any]:
    """The request rows in any payload form MLflow's scoring server accepts."""
    if not isinstance(payload, dict):
        return []
    if "messages" in payload or "prompt" in payload:
        return [payload]
    rows = payload.get("inputs", payload.get("dataframe_records", payload.get("instances")))
    if isinstance(rows, dict):
        # {"inputs": {"prompt": [...]}} (columns) or one row as a dict
        lengths = {len(v) for v in rows.values() if isinstance(v, list)}
        if len(lengths) == 1 and all(isinstance(v, list) for v in rows.values()):
            n = lengths.pop()
            return [{k: v[i] for k, v in rows.items()} for i in range(n)]
        return [rows]
    return list(rows) if isinstance(rows, list) else []


def completion_from_events(
    events: list[tuple[float, bytes]],
) -> tuple[dict[str, Any] | None, float | None]:
    """A streamed answer (server-sent ``chat.completion.chunk`` events, each with the second it
    was sent) as the ``chat.completion`` it adds up to, and the time its first text was sent.
    """
    text: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] = {}
    ttft: float | None = None
    seen = False
    buffer = b""
    for sent, data in events:
        buffer += data
        *complete, buffer = buffer.split(b"\n\n")
        for event in complete:
            payload = event.decode("utf-8", "replace").removeprefix("data: ").strip()
            if not payload or payload == "[DONE]":
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                continue
            seen = True
            choice = (chunk.get("choices") or [{}])[0]
            piece = (choice.get("delta") or {}).get("content") or ""
            if piece and ttft is None:
                ttft = sent
            text.append(piece)
            finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    if not seen:
        return None, None
    completion = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }
    return completion, ttft


def _answers(body: Any, n: int) -> list[Any]:
    if isinstance(body, dict) and "predictions" in body:
        predictions = body["predictions"]
    elif isinstance(body, dict) and "choices" in body:
        predictions = [body]
    else:
        predictions = body
    if isinstance(predictions, dict):
        predictions = [predictions]
    if not isinstance(predictions, list):
        return [None] * n
    predictions = list(predictions)[:n]
    return predictions + [None] * (n - len(predictions))


def _answer_fields(answer: Any) -> tuple[str | None, str | None, dict[str, Any]]:
    """(response text, finish reason, usage) of one prediction of either flavor."""
    if isinstance(answer, str):
        return answer, None, {}
    if not isinstance(answer, dict):
        return None, None, {}
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    text = message.get("content") if isinstance(message, dict) else None
    usage = answer.get("usage")
    return text, choice.get("finish_reason"), usage if isinstance(usage, dict) else {}


def _prompt_text(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages")
    if isinstance(messages, list):
        return "\n".join(
            f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, dict)
        )
    return None


def _error_message(body: Any, status_code: int) -> str:
    if isinstance(body, dict) and body.get("message"):
        return f"HTTP {status_code}: {body.get('error_code', '')} {body['message']}".strip()
    return f"HTTP {status_code}"


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
