"""OpenAI-compatible routes beside MLflow's ``/invocations``: ``POST /v1/chat/completions``
and ``GET /v1/models``.

A chat completion request is turned into the chat row both flavors take (`chat_row`), checked
by the same validator as every ``/invocations`` chat row, then answered by the same model:
through MLflow's scoring app (so its schema check, error mapping and request timeout apply
unchanged) or, with ``"stream": true``, from the model's ``predict_stream`` as
``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``. The answer's
``model`` names what is served (`ServedModel`: ``<name>/<version>`` of a registered model, its
name alone while a traffic plan is in force), never what the packaging machine called it.
Errors come in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with MLflow's status for the error code
(RESOURCE_EXHAUSTED -> 429, DEADLINE_EXCEEDED -> 504...), so OpenAI's clients raise their
own error types carrying the server's message.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from phi3_chat.admission import retry_after_of
from phi3ops.serving.exchange import (
    TIMEOUT_STATUS,
    Exchange,
    iterate_in_thread,
    next_chunk,
    send_event,
    send_json,
    start_events,
    stream_refusal,
)
from phi3ops.serving.request import ASGIApp, Message, ParsedRequest, Receive, Scope, Send
from phi3ops.serving.validate import FEATURE_FIELDS, feature_problem, model_features, quiet_reason

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
#: (status, MLflow error code, message) a request is refused with; None when it is fine.
Problem = tuple[int, str, str] | None
#: Request fields that change the answer in ways this server cannot honour (value: what is fine).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": ([],),  # OpenAI's deprecated form of tools: send tools
    "function_call": ("none",),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
#: Request fields an error's ``param`` may name (the field its message starts with).
_FIELDS = frozenset(
    {
        "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "stop", "n", "stream", "stream_options", "model", "user", "prompt",
        *FEATURE_FIELDS, *_UNSUPPORTED,
    }
)  # fmt: skip
#: ``param`` of a 400 about the body as a whole (not JSON, not an object, too deep...).
BODY_PARAM = "body"
_PARAM = re.compile(r"^(?:request\[\d+\]\.)?(?:params\[')?([a-z_]+)")
_MLFLOW_PREFIX = re.compile(r"^Failed to predict data .*?\nError: ", re.DOTALL)
_LOCAL_PATH = re.compile(r"^(?:[/~\\]|\.{1,2}[/\\]|[A-Za-z]:[/\\]|file:)")


class RequestProblem(Exception):
    """A chat completion request the server refuses before any model sees it; its message
    starts with the field it is about (the error's ``param``).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ServedModel:
    """What the server serves, as the OpenAI routes name it.

    Attributes:
        id: The model id answers carry: ``<name>/<version>`` for a registered model (its
            registered name alone while a traffic plan is in force: `among`), else ``model``.
            Never a path of any machine.
        names: Every ``model`` a request may name to mean it (the id, the registered name,
            ``<name>@<alias>``, the URI, and while a plan is in force every arm's id).
        created: When the server started, seconds since the epoch.
        name: The registered model's name, if it is one.
    """

    id: str
    names: frozenset[str] = frozenset()
    created: int = field(default_factory=lambda: int(time.time()))
    name: str | None = None

    @classmethod
    def of(cls, *, name: str | None, version: str | None, uri: str | None) -> ServedModel:
        """The served model from the server's environment (any part may be missing)."""
        if name and version:
            model_id = f"{name}/{version}"
        else:
            model_id = uri if uri and not is_local_path(uri) else "model"
        names = {model_id, *(n for n in (name, uri) if n)}
        if uri and uri.startswith("models:/"):
            names.add(uri.removeprefix("models:/"))
        return cls(id=model_id, names=frozenset(names), name=name or None)

    def among(self, others: Iterable[ServedModel], *, plan: bool) -> ServedModel:
        """How this model is named while it serves beside ``others`` (the other arms): any of
        their names is accepted too, and while a traffic ``plan`` is in force answers carry the
        registered name alone, so a client cannot tell which arm answered it.
        """
        names = self.names.union(*(other.names for other in others))
        model_id = self.name if plan and self.name else self.id
        return replace(self, id=model_id, names=names | {model_id})

    def answer_model(self, value: Any) -> Any:
        """The ``model`` an answer carries instead of the model's own ``value``: this id while
        a plan is in force (the registered name), and never a local path (the transformers
        flavor's answers name the packaging machine's snapshot folder).
        """
        if self.name is not None and self.id == self.name:
            return self.id
        if isinstance(value, str) and is_local_path(value):
            return self.name or self.id
        return value

    def listing(self) -> dict[str, Any]:
        """The ``GET /v1/models`` answer."""
        return {"object": "list", "data": [self.card()]}

    def card(self) -> dict[str, Any]:
        """The ``GET /v1/models/<id>`` answer."""
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "phi3ops"}


def is_local_path(value: str) -> bool:
    """Whether ``value`` names a file or folder of some machine (POSIX, Windows, ``file:``)."""
    return bool(_LOCAL_PATH.match(value))


def error_body(status: int, message: str, *, code: str | None = None) -> dict[str, Any]:
    """An error in OpenAI's shape; ``param`` is the request field the message starts with, and
    every 400 has one: `BODY_PARAM` when the message is about the body as a whole.

    Args:
        status: The HTTP status.
        message: What went wrong and how to fix it.
        code: MLflow's error code (sent lower-case, as OpenAI's codes are).

    Returns:
        ``{"error": {"message", "type", "param", "code"}}``.
    """
    match = _PARAM.match(message)
    param = match.group(1) if match and match.group(1) in _FIELDS else None
    if param is None and status == 400:
        param = BODY_PARAM
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if status == TIMEOUT_STATUS:
        kind = "timeout"
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code.lower() if code else None,
        }
    }


def chat_row(payload: Any, served: ServedModel) -> tuple[dict[str, Any], bool, bool]:
    """The chat row a chat completion request asks for, as both flavors take it.

    ``max_completion_tokens`` becomes ``max_tokens``, a single ``stop`` string a list, text
    content parts one string, the ``developer`` role ``system``; ``user`` is checked and
    dropped. Structured outputs, tools, ``seed`` and logprobs (`FEATURE_FIELDS`) go to the
    model, which checks them with the shared validator, as it does every field it reads.

    Args:
        payload: The parsed request body.
        served: What the server serves (a request naming another model is refused).

    Returns:
        (row, stream, include_usage).

    Raises:
        RequestProblem: The request is not one this server can answer.
    """
    if not isinstance(payload, Mapping):
        raise _bad("the body must be a JSON object with messages (a chat completion request)")
    body = {key: value for key, value in payload.items() if value is not None}
    model = body.get("model")
    if model is not None and model not in served.names:
        raise RequestProblem(
            404,
            "RESOURCE_DOES_NOT_EXIST",
            f"model: this server serves {served.id!r} (GET /v1/models), got {str(model)[:200]!r}",
        )
    if "messages" not in body:
        raise _bad("messages is required: a list of {role, content} objects")
    for name, fine in _UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise _bad(f"{name} is not supported by this server; send the request without it")
    if "user" in body and not isinstance(body["user"], str):
        raise _bad("user must be a string")
    row: dict[str, Any] = {"messages": _messages(body["messages"])}
    for name in FEATURE_FIELDS:
        if name in body:
            row[name] = body[name]
    if "max_completion_tokens" in body:
        if "max_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
            raise _bad("max_tokens and max_completion_tokens differ; send one of them")
        row["max_tokens"] = body["max_completion_tokens"]
    for name in ("max_tokens", "temperature", "top_p", "n", "stream"):
        if name in body:
            row[name] = body[name]
    if "stop" in body:
        row["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    stream = body.get("stream") is True
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _bad("stream_options is only allowed with stream: true")
    if options is not None and (
        not isinstance(options, Mapping)
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise _bad("stream_options must be an object whose include_usage is true or false")
    return row, stream, bool(options and options.get("include_usage"))


def _messages(messages: Any) -> Any:
    """``messages`` with text content parts joined into one string (others left for the
    validator to refuse), ``developer`` as ``system``, and only role, content, tool calls and
    the tool call a result answers kept.
    """
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            out.append(message)
            continue
        content = message.get("content")
        if isinstance(content, list) and all(
            isinstance(part, Mapping) and part.get("type") == "text" for part in content
        ):
            content = "".join(str(part.get("text", "")) for part in content)
        role = message.get("role")
        kept = {
            "role": "system" if role == "developer" else role,
            "content": content,
            "tool_calls": message.get("tool_calls"),
            "tool_call_id": message.get("tool_call_id"),
        }
        out.append({key: value for key, value in kept.items() if key in message})
    return out


def _model_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as the model takes it: ``n`` (only 1 passes the validator) and ``stream``
    are the route's, not the model's.
    """
    return {key: value for key, value in row.items() if key not in ("n", "stream")}


def _bad(message: str) -> RequestProblem:
    return RequestProblem(400, "INVALID_PARAMETER_VALUE", message)


class ChatCompletions:
    """``POST /v1/chat/completions`` for one served model.

    Args:
        app: MLflow's scoring app (answers non-streamed requests through ``/invocations``).
        model: The loaded pyfunc (its ``predict_stream`` answers streamed requests).
        served: What the server serves.
        problem: The serving layer's validator: ``problem(payload, rows)``.
        timeout_s: Seconds after which a stream is cut off (MLflow's app times the rest).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        model: Any,
        served: ServedModel,
        problem: Callable[[Any, list[Any]], Problem],
        timeout_s: float | None,
    ) -> None:
        self.app = app
        self.model = model
        self.served = served
        self.problem = problem
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, request: ParsedRequest, exchange: Exchange) -> None:
        """Validates the request, then answers it whole or as a stream."""
        if request.method != "POST":
            await self.refuse(exchange, 405, "BAD_REQUEST", "use POST for chat completions")
            return
        if request.error is not None:
            await self.refuse(
                exchange, 400, "MALFORMED_REQUEST", "the body is not JSON; send a JSON object"
            )
            return
        try:
            row, stream, include_usage = chat_row(request.payload, self.served)
        except RequestProblem as exc:
            await self.refuse(exchange, exc.status, exc.code, exc.message)
            return
        features = model_features(self.model)
        refused = feature_problem(row, features)
        if refused:
            await self.refuse(exchange, 400, "INVALID_PARAMETER_VALUE", refused)
            return
        row = {k: v for k, v in row.items() if k not in FEATURE_FIELDS or k in features}
        problem = self.problem(row, [row])
        if problem:
            await self.refuse(exchange, *problem)
        elif stream:
            await self._stream(_model_row(row), include_usage, exchange)
        else:
            await self._complete(scope, row, exchange)

    async def refuse(
        self, exchange: Exchange, status: int, code: str, message: str, *, ours: bool = True
    ) -> None:
        """Answers an error in OpenAI's shape. The serving layer's own ``message`` is recorded
        without what it quotes; a model's or MLflow's (``ours=False``) never is (it may quote
        the request): the record keeps the status and code.
        """
        if ours:
            exchange.reason = exchange.reason or quiet_reason(message)
        await send_json(exchange.send, status, error_body(status, message, code=code))

    async def _complete(self, scope: Scope, row: dict[str, Any], exchange: Exchange) -> None:
        """Asks MLflow's app (``/invocations``) and hands its answer on in OpenAI's shape."""
        data = json.dumps(_model_row(row)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        inner = {**scope, "path": "/invocations", "raw_path": b"/invocations", "headers": headers}
        answer = _Captured()
        await self.app(inner, _receive_once(data), answer.send)
        body = answer.json()
        if answer.status == 200 and (completion := _completion(body)) is not None:
            completion["model"] = self.served.id
            completion.setdefault("id", f"chatcmpl-{uuid.uuid4().hex}")
            completion.setdefault("created", int(time.time()))
            await send_json(exchange.send, 200, completion)
            return
        code, message = "INTERNAL_ERROR", answer.text()
        if isinstance(body, Mapping):
            code = str(body.get("error_code") or code)
            message = _MLFLOW_PREFIX.sub("", str(body.get("message") or message))
            exchange.retry_after_s = retry_after_of(dict(body))  # the model's predicted wait
        if answer.status == 200:  # an answer that is not a chat completion
            answer.status, message = 500, "the model answered without a chat completion"
        if answer.status == TIMEOUT_STATUS:
            code, message = "DEADLINE_EXCEEDED", f"{exchange.timeout_reason()}; try again"
        await self.refuse(exchange, answer.status, code, message, ours=False)

    async def _stream(self, row: dict[str, Any], include_usage: bool, exchange: Exchange) -> None:
        """Answers from ``predict_stream`` as ``chat.completion.chunk`` events."""
        chunks = iterate_in_thread(lambda: self.model.predict_stream(row), exchange.gone)
        kind, value = await next_chunk(chunks, exchange, self.timeout_s)
        refusal = stream_refusal(kind, value, exchange)
        if refusal is not None:
            status, code, message = refusal
            # A timeout is the server's own words; a model's may quote the request.
            await self.refuse(exchange, status, code, message, ours=kind == "timeout")
            return
        await start_events(exchange.send)
        while kind == "chunk":
            for event in self._events(value, include_usage, exchange):
                await send_event(exchange.send, json.dumps(event))
            kind, value = await next_chunk(chunks, exchange, self.timeout_s)
        if kind == "cancelled":
            return  # the client is gone: nothing more to send, the row is recorded as such
        if kind == "timeout":
            why = f"{exchange.timeout_reason()}; the answer is cut short"
            await send_event(exchange.send, json.dumps(error_body(TIMEOUT_STATUS, why)))
        elif kind == "error":  # headers are gone: the error can only be the last event
            await send_event(exchange.send, json.dumps(error_body(500, str(value))))
        await send_event(exchange.send, "[DONE]", last=True)

    def _events(
        self, chunk: Any, include_usage: bool, exchange: Exchange
    ) -> Iterator[dict[str, Any]]:
        """One model chunk as OpenAI's events: usage only in a last chunk of its own, and only
        when asked for (``stream_options.include_usage``).
        """
        if not isinstance(chunk, Mapping):
            return
        event = {**chunk, "model": self.served.id}
        usage = event.pop("usage", None)
        if include_usage:
            event["usage"] = None
        yield event
        if usage:
            exchange.usage = usage
            if include_usage:
                yield {**event, "choices": [], "usage": usage}


async def answer_invocation(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, *, served: ServedModel
) -> None:
    """MLflow's ``/invocations`` answer with each prediction's ``model`` named as the OpenAI
    routes name it (`ServedModel.answer_model`): no arm, no path of the packaging machine.
    Anything else (errors, answers that are not JSON) is passed on as MLflow sent it.
    """
    answer = _Captured()
    await app(scope, receive, answer.send)
    body = answer.json()
    if answer.status == 200 and _rename_model(body, served):
        await send_json(send, 200, body)
        return
    headers = [(k, v) for k, v in answer.headers if bytes(k).lower() != b"content-length"]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


def _rename_model(body: Any, served: ServedModel) -> bool:
    """Renames the ``model`` of every chat completion in ``body`` (bare, in a list or under
    ``predictions``), in place; whether any changed.
    """
    if isinstance(body, dict) and "predictions" in body:
        body = body["predictions"]
    changed = False
    for item in body if isinstance(body, list) else [body]:
        if isinstance(item, dict) and "model" in item:
            renamed = served.answer_model(item["model"])
            changed = changed or renamed != item["model"]
            item["model"] = renamed
    return changed


class _Captured:
    """An ASGI ``send`` that keeps a response instead of sending it."""

    def __init__(self) -> None:
        self.status = 500
        self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()[:500] or f"HTTP {self.status}"


def _receive_once(data: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data, "more_body": False}

    return receive


def _completion(body: Any) -> dict[str, Any] | None:
    """The ``chat.completion`` in MLflow's answer to one chat row (bare, in a list, or under
    ``predictions``).
    """
    if isinstance(body, Mapping) and "predictions" in body:
        body = body["predictions"]
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if isinstance(body, Mapping) and isinstance(body.get("choices"), list):
        return {**body, "object": "chat.completion"}
    return None
