"""Inference records: one MLflow trace per request row, for both flavors, each written once.

The serving layer (`phi3ops.serving.app`) sees every request and every answer, failed ones
included, whatever the flavor, so it is where records are made: served, refused, shed (429 /
503), cancelled by the client (499) or failed. `InferenceRecorder` turns an HTTP exchange into
records and hands them to a durable spool (`phi3ops.serving.spool`), whose writer thread stores
them as traces (`write_entries`): a root span carrying the record fields as one
``phi3ops.record`` attribute, tagged with the model name and version so the monitor finds a
version's records with ``mlflow.search_traces``. The trace id is the record's own, so a record
stored twice (after a crash) is still one trace.

Privacy: unless ``PHI3OPS_RECORD_PROMPTS`` is on, no prompt or answer text leaves the server
process: records keep lengths and counts (`TextFeatures`) and error messages are reduced to the
HTTP status, MLflow's error code and the serving layer's own reason (which never quotes the
request), because MLflow's and the model's messages may quote the input. The trace's inputs
and outputs are then summaries (`phi3ops.serving.trace_summary`: roles, counts, generation
parameters; outcome, finish reason, usage, arm, version), and so is what the MLflow trace list
shows of each request.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from phi3ops.serving.spool import Entry, RecordSpool
from phi3ops.serving.trace_summary import request_summary

# Where the records' traces are written; imported from here too.
from phi3ops.serving.trace_writer import _span_dict as _span_dict
from phi3ops.serving.trace_writer import trace_id_of as trace_id_of
from phi3ops.serving.trace_writer import write_entries as write_entries

_log = logging.getLogger(__name__)

#: Chat-template markers of Phi-3 (``<|end|>``, ``<|assistant|>``, ``<|user|>``, ``<|system|>``,
#: ``<|endoftext|>``...): none may reach a user.
TEMPLATE_TOKEN_REGEX = r"<\|[a-z_]+\|>"
#: Nginx's "client closed request": the client left before its answer was complete.
CANCELLED_STATUS = 499
#: Statuses of a request turned away because the server is full.
SHED_STATUSES = frozenset({429, 503})
#: What happened to a request row.
OUTCOMES = ("served", "refused", "shed", "cancelled", "error")
#: Outcomes of the client's making (input the server refused, a client that left): anyone can
#: cause them, so they are not the server failing and do not count against its error budget.
CLIENT_OUTCOMES = frozenset({"refused", "cancelled"})
_MAX_ERROR_CHARS = 500
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclass(frozen=True)
class InferenceRecord:
    """What one prediction did. Token counts and finish reason are None when the answer does
    not carry them (a prompt-shaped request answered with a bare string, or an error); the
    text features are None when there was no answer.
    """

    timestamp: float  # when the request arrived, seconds since the epoch
    model_name: str
    model_version: str
    latency_s: float  # wall time of the HTTP call the row was part of
    response: str | None  # the answer text, stored only when prompts are recorded
    error: str | None = None
    status_code: int = 200
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    context_tokens: int | None = None  # the served model's context window
    ttft_s: float | None = None  # time to first token, for streamed answers
    batch_size: int = 1
    prompt: str | None = None  # only when prompts are recorded
    outcome: str = "served"  # one of OUTCOMES
    response_chars: int | None = None  # length of the answer text
    blank_response: bool | None = None  # the answer has no visible character
    template_tokens: int | None = None  # chat-template markers in the answer
    arm: str = "champion"  # the alias that answered: champion or candidate (`phi3ops.traffic`)
    shadow: bool = False  # a shadow copy: answered in the background, never seen by the client
    # The request's own choices, which the canary verdict compares arms within (None: unset).
    max_tokens: int | None = None
    stop_given: bool | None = None  # it named stop sequences
    stream: bool | None = None

    @classmethod
    def from_attribute(cls, value: dict[str, Any]) -> InferenceRecord:
        """The record stored by `InferenceRecorder` (unknown keys are ignored; a record stored
        before text features existed gets them from its text).
        """
        known = {f.name for f in fields(cls)}
        record = cls(**{k: v for k, v in value.items() if k in known})
        return record if "response_chars" in value else with_text_features(record)


def with_text_features(record: InferenceRecord) -> InferenceRecord:
    """``record`` with the lengths and counts of its response text (what the monitor checks);
    a record without text keeps the ones it has.
    """
    text = record.response
    if text is None:
        return record
    return replace(
        record,
        response_chars=len(text),
        blank_response=not text.strip(),
        template_tokens=len(re.findall(TEMPLATE_TOKEN_REGEX, text)),
    )


def outcome_of(status_code: int, *, answered: bool = True) -> str:
    """The outcome of a row the server answered with ``status_code`` (`OUTCOMES`)."""
    if status_code == CANCELLED_STATUS:
        return "cancelled"
    if status_code in SHED_STATUSES:
        return "shed"
    if 400 <= status_code < 500:
        return "refused"
    if status_code >= 500 or not answered:
        return "error"
    return "served"


class InferenceRecorder:
    """Records the inference of one model version: to a spool, which stores them as traces.

    Args:
        model_name: The served registered model.
        model_version: Its version.
        experiment_id: The MLflow experiment the traces go to.
        record_prompts: Store prompt and answer text (else only lengths and counts).
        context_tokens: The served model's context window, for each record.
        spool: Where records wait for the tracking store; needed by `record` and
            `record_exchange` (`records_for` alone needs none).
        model_id: The logged model behind the version (its ``MLmodel``'s ``model_id``): the
            traces' ``mlflow.modelId``, which links them to it in the MLflow UI.
    """

    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        experiment_id: str,
        record_prompts: bool = False,
        context_tokens: int | None = None,
        spool: RecordSpool | None = None,
        model_id: str | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = str(model_version)
        self.experiment_id = experiment_id
        self.record_prompts = record_prompts
        self.context_tokens = context_tokens
        self.spool = spool
        self.model_id = model_id

    def entry(self, record: InferenceRecord, *, request: Any = None, params: Any = None) -> Entry:
        """The stored form of ``record``: without any text unless prompts are recorded.

        Args:
            record: The record.
            request: Its request row: the span's inputs when prompts are recorded, else
                summarised without its text (`request_summary`).
            params: The payload's ``params`` (MLflow's ``/invocations``), for the summary.

        Returns:
            A JSON-ready spool entry, with a new record id.
        """
        record = with_text_features(record)
        if not self.record_prompts:
            record = replace(record, prompt=None, response=None)
        return {
            "id": uuid.uuid4().hex,
            "experiment_id": self.experiment_id,
            "record": asdict(record),
            "inputs": (
                request
                if self.record_prompts
                else request_summary(request, params=params if isinstance(params, dict) else None)
            ),
            "prompts_recorded": self.record_prompts,
            "model_id": self.model_id,
        }

    def record(self, record: InferenceRecord, *, request: Any = None, params: Any = None) -> str:
        """Spool ``record``; returns the id of the trace it becomes."""
        entry = self.entry(record, request=request, params=params)
        self._spool().append([entry])
        return trace_id_of(entry)

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
        reason: str | None = None,
        arm: str = "champion",
        shadow: bool = False,
    ) -> list[tuple[InferenceRecord, Any]]:
        """Pair each request row of an HTTP exchange with its answer (or the call's error);
        ``rows`` are ``request_rows(payload)`` when the caller has them already, ``reason`` the
        serving layer's own words for a refusal (kept even when messages are redacted),
        ``arm`` the alias that answered and ``shadow`` whether the client never saw it.
        """
        rows = request_rows(payload) if rows is None else rows
        if not rows:
            rows = [payload]  # malformed: still one record, of the error the server answered
        answers = _answers(body, len(rows)) if status_code < 400 else [None] * len(rows)
        error = (
            None
            if status_code < 400
            else _error_message(body, status_code, reason=reason, full=self.record_prompts)
        )
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
                outcome=outcome_of(status_code, answered=answer is not None),
                arm=arm,
                shadow=shadow,
                **_request_choices(row, payload),
            )
            out.append((with_text_features(record), row))
        return out

    def record_exchange(self, payload: Any, **exchange: Any) -> int:
        """Spool a record of every row of one HTTP exchange (`records_for`'s arguments); never
        raises: serving must not fail because recording does.
        """
        try:
            params = payload.get("params") if isinstance(payload, dict) else None
            entries = [
                self.entry(record, request=row, params=params)
                for record, row in self.records_for(payload, **exchange)
            ]
            self._spool().append(entries)
        except Exception:
            _log.exception("Could not spool inference records")
            return 0
        return len(entries)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record spooled so far is stored; whether it was within ``timeout``."""
        return self.spool.flush(timeout) if self.spool is not None else True

    def close(self, timeout: float | None = 15.0) -> bool:
        """Store what is spooled and stop (`RecordSpool.close`); whether everything was stored."""
        return self.spool.close(timeout) if self.spool is not None else True

    def _spool(self) -> RecordSpool:
        if self.spool is None:
            raise RuntimeError("This recorder has no spool: give it one to record.")
        return self.spool


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


def sse_chunks(events: list[tuple[float, bytes]]) -> Iterator[tuple[float, dict[str, Any]]]:
    """Each JSON object a stream's server-sent events carry, with the second its bytes were
    sent; blank, ``[DONE]`` and unparseable events are skipped. One reading of a stream for
    its record and its metrics.
    """
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
            if isinstance(chunk, dict):
                yield sent, chunk


def completion_from_events(
    events: list[tuple[float, bytes]],
) -> tuple[dict[str, Any] | None, float | None]:
    """A streamed answer (server-sent ``chat.completion.chunk`` events, each with the second it
    was sent) as the ``chat.completion`` it adds up to, and the time its first text was sent.
    """
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}  # by the deltas' index
    finish: str | None = None
    usage: dict[str, Any] = {}
    ttft: float | None = None
    seen = False
    for sent, chunk in sse_chunks(events):
        seen = True
        choice = (chunk.get("choices") or [{}])[0]
        delta = choice.get("delta") or {}
        piece = delta.get("content") or ""
        call_deltas = delta.get("tool_calls") or []
        if (piece or call_deltas) and ttft is None:
            ttft = sent
        text.append(piece)
        for call_delta in call_deltas if isinstance(call_deltas, list) else []:
            if isinstance(call_delta, dict):
                _merge_call_delta(calls, call_delta)
        finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
    if not seen:
        return None, None
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message = {
            **message,
            "content": message["content"] or None,
            "tool_calls": [calls[index] for index in sorted(calls)],
        }
    completion = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }
    return completion, ttft


def _merge_call_delta(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Add one streamed ``tool_calls`` delta to the call of its index, as OpenAI streams them:
    the first delta of a call names it, the later ones carry pieces of its arguments.
    """
    index = delta.get("index")
    index = index if isinstance(index, int) and not isinstance(index, bool) else len(calls)
    call = calls.setdefault(
        index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
    )
    for key in ("id", "type"):
        if isinstance(delta.get(key), str):
            call[key] = delta[key]
    function = delta.get("function")
    if isinstance(function, dict):
        for key in ("name", "arguments"):
            if isinstance(function.get(key), str):
                call["function"][key] += function[key]


def answer_usage(body: Any, rows: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of an answer of ``rows`` rows, added up over the
    rows whose answer carries OpenAI's ``usage`` (either flavor, either route).
    """
    prompt = completion = 0
    for answer in _answers(body, rows):
        _, _, usage = _answer_fields(answer)
        prompt += _int(usage.get("prompt_tokens")) or 0
        completion += _int(usage.get("completion_tokens")) or 0
    return prompt, completion


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
    text = _message_text(message) if isinstance(message, dict) else None
    usage = answer.get("usage")
    return text, choice.get("finish_reason"), usage if isinstance(usage, dict) else {}


def _message_text(message: dict[str, Any]) -> str | None:
    """The text an answer's message shows: its content, else its tool calls as the JSON list
    of their ``function`` objects (a call is an answer, never a blank one: the monitor and the
    canary verdict read its length and markers like any other).
    """
    content = message.get("content")
    calls = message.get("tool_calls")
    if (content is None or content == "") and isinstance(calls, list) and calls:
        functions = [c.get("function") if isinstance(c, dict) else c for c in calls]
        return json.dumps(functions, ensure_ascii=False)
    return content if isinstance(content, str) or content is None else str(content)


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


def _error_message(body: Any, status_code: int, *, reason: str | None, full: bool) -> str:
    """``HTTP <status> <error code>: <why>`` (of MLflow's or OpenAI's error shape). The why is
    the answer's own message only when ``full`` (prompts are recorded: MLflow's and the model's
    messages may quote the request); else the serving layer's ``reason``, which never does, or
    nothing.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):  # OpenAI's shape (the /v1 routes)
        body = {"error_code": str(error.get("code") or "").upper(), "message": error.get("message")}
    code = body.get("error_code") if isinstance(body, dict) else None
    head = f"HTTP {status_code}"
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        head = f"{head} {code}"
    message = body.get("message") if isinstance(body, dict) else None
    if full and message:
        return f"{head}: {str(message)[:_MAX_ERROR_CHARS]}"
    return f"{head}: {reason}" if reason else head


def _request_choices(row: Any, payload: Any) -> dict[str, Any]:
    """``max_tokens``, ``stop_given`` and ``stream`` of a row (under the payload's ``params``)."""
    params = payload.get("params") if isinstance(payload, dict) else None
    given = {
        **(params if isinstance(params, dict) else {}),
        **(row if isinstance(row, dict) else {}),
    }
    stop, stream = given.get("stop"), given.get("stream")
    return {
        "max_tokens": _int(given.get("max_tokens")),
        "stop_given": None if stop is None else bool(stop),
        "stream": stream if isinstance(stream, bool) else None,
    }


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
