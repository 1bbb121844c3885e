"""The ASGI app behind `phi3ops serve`: MLflow's scoring server, plus a guard for chat requests.

``mlflow models serve --env-manager local`` runs ``uvicorn mlflow.pyfunc.scoring_server.app:app``
on a downloaded model. This module builds the very same app (``scoring_server.init``) and wraps
it, because the serving layer is the one place that sees every request of both flavors: the
transformers flavor's ``predict`` is MLflow's own code and happily generates from a prompt
longer than the model's context, so that check happens here, before the model runs.

Run by uvicorn as ``phi3ops.serving.app:create_app`` (``--factory``); the model folder comes
from ``PHI3OPS_SERVE_MODEL_PATH``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import cached_property
from pathlib import Path
from typing import Any

MODEL_PATH_ENV = "PHI3OPS_SERVE_MODEL_PATH"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TransformersContextLimit:
    """Counts a chat request's prompt tokens with a transformers model's own tokenizer."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        config = json.loads((model_path / "model" / "config.json").read_text())
        self.context = int(config["max_position_embeddings"])
        mlmodel = _mlmodel(model_path)
        inference = mlmodel["flavors"]["transformers"].get("inference_config") or {}
        model_config = mlmodel["flavors"]["python_function"].get("config") or {}
        self.default_new_tokens = int(
            model_config.get("max_new_tokens") or inference.get("max_new_tokens") or 0
        )

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path / "components" / "tokenizer")

    def problem(self, request: dict[str, Any]) -> str | None:
        """Why ``request`` cannot fit the context, or None when it fits (or is not chat)."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            return None  # not a well-formed chat request: MLflow's schema check answers it
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True
            )
        except Exception:
            return None  # e.g. an unknown role: left to the model's own validation
        # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list.
        prompt_tokens = len(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        max_tokens = request.get("max_tokens")
        new_tokens = max_tokens if isinstance(max_tokens, int) else self.default_new_tokens
        if prompt_tokens >= self.context:
            return (
                f"messages: the prompt is {prompt_tokens} tokens but the model's context is "
                f"{self.context} tokens; shorten the conversation."
            )
        if prompt_tokens + new_tokens > self.context:
            return (
                f"max_tokens={new_tokens} does not fit: prompt uses {prompt_tokens} of "
                f"{self.context} tokens; lower max_tokens or shorten the conversation."
            )
        return None


class ChatRequestGuard:
    """ASGI middleware: answers 400 for chat requests that cannot fit the model's context."""

    def __init__(self, app: ASGIApp, *, limit: TransformersContextLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        body, messages = await _read_body(receive)
        problem = None
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            payload = None  # MLflow answers malformed JSON itself
        for request in _chat_requests(payload):
            problem = problem or self.limit.problem(request)
        if problem:
            await _send_json(
                send, 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": problem}
            )
            return
        await self.app(scope, _replay(messages), send)


def create_app() -> Any:
    """MLflow's scoring app for the model at ``$PHI3OPS_SERVE_MODEL_PATH``, guarded."""
    from mlflow.pyfunc import scoring_server

    model_path = Path(os.environ[MODEL_PATH_ENV])
    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(str(model_path)))
    if "transformers" in _mlmodel(model_path).get("flavors", {}):
        app.add_middleware(ChatRequestGuard, limit=TransformersContextLimit(model_path))
    return app


def _mlmodel(model_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((model_path / "MLmodel").read_text())


def _chat_requests(payload: Any) -> list[dict[str, Any]]:
    """The chat-shaped requests in any payload form the scoring server accepts."""
    if not isinstance(payload, dict):
        return []
    if "messages" in payload:
        return [payload]
    rows = payload.get("inputs", payload.get("dataframe_records", payload.get("instances")))
    if isinstance(rows, dict):
        rows = [rows]
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    messages, chunks = [], []
    while True:
        message = await receive()
        messages.append(message)
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks), messages


def _replay(messages: list[Message]) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    return receive


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
