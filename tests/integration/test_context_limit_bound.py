"""The transformers flavor's context check runs on the server's event loop: a prompt whose
characters already prove it cannot fit is refused without tokenizing (a million characters took
about a second through the chat template), and a prompt near the context is still counted
exactly. The tiny Phi-3's own tokenizer, in the folder layout MLflow's transformers flavor logs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from phi3ops.serving.model_folder import TransformersContextLimit

pytestmark = pytest.mark.slow

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture
def limit(tiny_phi3, tmp_path: Path) -> TransformersContextLimit:
    folder = tmp_path / "model-folder"
    (folder / "components" / "tokenizer").mkdir(parents=True)
    (folder / "model").mkdir()
    for name in TOKENIZER_FILES:
        if (tiny_phi3.pytorch_dir / name).exists():
            shutil.copy(tiny_phi3.pytorch_dir / name, folder / "components" / "tokenizer" / name)
    shutil.copy(tiny_phi3.pytorch_dir / "config.json", folder / "model" / "config.json")
    flavors = {
        "transformers": {"inference_config": {"max_new_tokens": 16}},
        "python_function": {"config": {}},
    }
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))
    checked = TransformersContextLimit(folder)
    _ = checked.tokenizer  # as the server loads it
    return checked


class Counting:
    """Counts the tokenizer's chat-template calls."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def test_a_prompt_too_long_by_its_characters_is_refused_without_tokenizing(limit) -> None:
    counting = Counting(limit.tokenizer)
    limit.__dict__["tokenizer"] = counting
    assert limit.most_chars_per_token >= 2
    huge = "the quick brown fox jumps " * 40_000  # 1,040,000 characters
    problem = limit.problem(chat(huge))
    assert problem is not None and "at least" in problem and "shorten" in problem
    assert counting.calls == 0
    # What the bound cannot settle is counted: a short prompt fits, one just past the context
    # (in tokens, not characters) is refused with its exact count.
    assert limit.problem(chat("hello")) is None
    assert counting.calls == 1
    context = json.loads((limit.model_path / "model" / "config.json").read_text())
    near = "a b " * context["max_position_embeddings"]
    assert len(near) // limit.most_chars_per_token < limit.context  # not settled by length
    problem = limit.problem(chat(near))
    assert problem is not None and "at least" not in problem and "tokens" in problem
    assert counting.calls == 2
