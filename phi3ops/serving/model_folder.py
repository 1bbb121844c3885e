"""What a downloaded MLflow model folder says about serving it: its ``MLmodel`` file, its
context window, and the transformers flavor's context check (the serving layer's: MLflow's
transformers ``predict`` generates from a prompt longer than the model's context).

The check runs on the server's event loop, and tokenizing holds it (a 1,000,000-character
message took about 1 s through the chat template here), so a prompt whose length in characters
already proves it cannot fit is refused without tokenizing: no token of the vocabulary stands
for more characters than its own spelling (`TransformersContextLimit.most_chars_per_token`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from phi3_chat.folder import usable_context
from phi3ops.serving.validate import transformers_problem


class TransformersContextLimit:
    """Counts a chat request's prompt tokens with a transformers model's own tokenizer."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        config = json.loads((model_path / "model" / "config.json").read_text())
        self.context = int(config["max_position_embeddings"])
        mlmodel = read_mlmodel(model_path)
        inference = mlmodel["flavors"]["transformers"].get("inference_config") or {}
        model_config = mlmodel["flavors"]["python_function"].get("config") or {}
        self.most_chars_per_token = 0  # set with the tokenizer
        self.default_new_tokens = int(
            model_config.get("max_new_tokens") or inference.get("max_new_tokens") or 0
        )

    @cached_property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded on first use (with `most_chars_per_token`)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_path / "components" / "tokenizer")
        # An upper bound on the characters of text one token stands for: twice its longest
        # spelling in the vocabulary (a byte-fallback token's spelling is longer than its
        # text; the factor covers normalizers that merge characters). Found once, at load.
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.most_chars_per_token = 2 * longest
        return tokenizer

    def problem(self, request: Any) -> str | None:
        """Why ``request`` cannot fit the context, or None when it fits (or is not chat)."""
        messages = request.get("messages") if isinstance(request, dict) else None
        if not isinstance(messages, list):
            return None  # not a chat request: MLflow's schema check answers it
        refused = transformers_problem(request)  # what MLflow's transformers pyfunc cannot do
        if refused:
            return refused
        for i, message in enumerate(messages):
            # MLflow's transformers predict fails with a 500 on these; they are the caller's.
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return f"messages[{i}].content: each message needs a string 'content'."
        max_tokens = request.get("max_tokens")
        new_tokens = max_tokens if isinstance(max_tokens, int) else self.default_new_tokens
        chars = sum(len(message["content"]) for message in messages)
        tokenizer = self.tokenizer  # loaded with the server; sets most_chars_per_token
        at_least = chars // self.most_chars_per_token  # without tokenizing, on the event loop
        if at_least >= self.context:
            return (
                f"messages: the prompt is at least {at_least} tokens ({chars} characters) but "
                f"the model's context is {self.context} tokens; shorten the conversation."
            )
        try:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception:
            return None  # e.g. an unknown role: left to the model's own validation
        # transformers 5 returns a BatchEncoding (a Mapping) where 4.x returned a list.
        prompt_tokens = len(ids["input_ids"] if isinstance(ids, Mapping) else ids)
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


def context_tokens(model_path: Path) -> int | None:
    """The served model's context window (prompt plus answer), for either flavor."""
    flavors = read_mlmodel(model_path).get("flavors", {})
    if "transformers" in flavors:
        return TransformersContextLimit(model_path).context
    for config in model_path.rglob("genai_config.json"):
        return usable_context(json.loads(config.read_text())["model"])
    return None


def read_mlmodel(model_path: Path) -> dict[str, Any]:
    """The ``MLmodel`` file of the model folder ``model_path``, parsed."""
    import yaml

    return yaml.safe_load((model_path / "MLmodel").read_text())
