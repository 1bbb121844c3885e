"""A finished row as OpenAI's ``chat.completion``, and a running one as its chunks.

An answer that is tool calls (`phi3_chat.tools`) carries ``message.tool_calls`` with
``content: null`` and ``finish_reason: "tool_calls"``; streamed, its text is held back and each
call is one ``delta.tool_calls`` entry (``index``, ``id``, ``type``, ``function.name`` and the
whole ``function.arguments``) once the answer is complete; an answer that turns out to be text
streams as text. With ``logprobs``, ``choices[0].logprobs.content`` lists each generated token
with its log probability, bytes and ``top_logprobs``; streamed, each chunk carries the tokens
generated since the previous one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from phi3_chat.request import _Request, _RowState

__all__ = ["StreamWriter", "chat_answer", "usage"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = str(tokenizer.decode(np.asarray([token], dtype=np.int32)))
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprob_content(tokenizer: Any, entries: list[Any]) -> list[dict[str, Any]]:
    """``logprobs.content`` for ``(token, logprob, [(token, logprob)...])`` entries."""
    return [
        {
            **_token(tokenizer, token, logprob),
            "top_logprobs": [_token(tokenizer, other, value) for other, value in top],
        }
        for token, logprob, top in entries
    ]


def _message_and_reason(state: _RowState) -> tuple[dict[str, Any], str | None]:
    tools = state.request.tools
    calls = tools.calls(state.text) if tools is not None else None
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": state.text}, state.finish_reason


def chat_answer(state: _RowState, *, model_name: str, tokenizer: Any) -> dict[str, Any]:
    """The ``chat.completion`` of a finished chat row."""
    message, reason = _message_and_reason(state)
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": reason}
    if state.request.logprobs is not None:
        choice["logprobs"] = {"content": logprob_content(tokenizer, state.token_logprobs)}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [choice],
        "usage": usage(len(state.request.input_ids), state.completion_tokens),
    }


class StreamWriter:
    """The ``chat.completion.chunk`` dicts of one streamed chat row."""

    def __init__(self, request: _Request, *, model_name: str, tokenizer: Any) -> None:
        self.request = request
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._logprobs_sent = 0
        tools = request.tools
        self._held = tools is not None and tools.calls_possible  # maybe calls: wait and see
        self._pending = ""  # text held back while it may be calls

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        state: _RowState | None = None,
    ) -> dict[str, Any]:
        """One chunk; with ``state``, the logprobs of the tokens not sent yet ride along."""
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if state is not None and self.request.logprobs is not None:
            entries = state.token_logprobs[self._logprobs_sent :]
            self._logprobs_sent += len(entries)
            choice["logprobs"] = {"content": logprob_content(self.tokenizer, entries)}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_name,
            "choices": [choice],
        }

    def first(self) -> dict[str, Any]:
        """The opening chunk: the role."""
        return self.chunk({"role": "assistant", "content": ""})

    def text(self, piece: str, state: _RowState | None) -> list[dict[str, Any]]:
        """Chunks for a new piece of text (none while it may still become tool calls)."""
        if self._held:
            self._pending += piece
            if not self._pending or self._pending.startswith("<"):
                return []
            self._held, piece, self._pending = False, self._pending, ""  # it is text
        return [self.chunk({"content": piece}, state=state)]

    def last(self, state: _RowState) -> list[dict[str, Any]]:
        """The closing chunks: held text or the calls, then the finish reason and usage."""
        out = []
        message, reason = _message_and_reason(state)
        calls = message.get("tool_calls")
        if calls:
            deltas = [{**call, "index": index} for index, call in enumerate(calls)]
            out.append(self.chunk({"tool_calls": deltas}))
        elif self._pending:
            out.append(self.chunk({"content": self._pending}))
        final = self.chunk({}, reason, state=state)
        final["usage"] = usage(len(state.request.input_ids), state.completion_tokens)
        out.append(final)
        return out
