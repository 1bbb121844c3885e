"""Model cards and license of the tiny Phi-3 repos (deterministic: no dates, no paths)."""

from __future__ import annotations

from dataclasses import asdict

from offline.tiny_phi3.recipe import TinyPhi3Recipe
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID

__all__ = ["LICENSE", "onnx_model_card", "pytorch_model_card"]


def pytorch_model_card(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    """The ``README.md`` of the PyTorch repo.

    Args:
        recipe: The recipe built.
        recipe_hash: Its cache key.

    Returns:
        The model card, front matter included.
    """
    return (
        _card_front_matter()
        + f"# Tiny random Phi-3 ({recipe.name}), laid out like {PYTORCH_REPO_ID}\n\n"
        "A randomly initialised `Phi3ForCausalLM` built offline by "
        "`offline.tiny_phi3` for tests, demos and benchmarks. It has Phi-3's "
        "architecture, special tokens and chat template, but it knows nothing: its output is "
        "noise. It is not Microsoft's model.\n\n"
        "Chat format:\n\n```\n<|system|>\nYou are helpful.<|end|>\n<|user|>\nHello<|end|>\n"
        "<|assistant|>\n```\n\n" + _recipe_table(recipe, recipe_hash)
    )


def onnx_model_card(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    """The ``README.md`` of the ONNX repo.

    Args:
        recipe: The recipe built.
        recipe_hash: Its cache key.

    Returns:
        The model card, front matter included.
    """
    return (
        _card_front_matter()
        + f"# Tiny random Phi-3 ({recipe.name}) for ONNX Runtime GenAI, laid out like "
        f"{ONNX_REPO_ID}\n\n"
        f"`{ONNX_CPU_INT4_SUBFOLDER}/` holds the int4 CPU build (RTN, block size 32, accuracy "
        "level 4) of the tiny random PyTorch model, made with "
        "`onnxruntime_genai.models.builder`. Load it with `onnxruntime_genai.Model`.\n\n"
        + _recipe_table(recipe, recipe_hash)
    )


def _card_front_matter() -> str:
    return (
        "---\n"
        "license: mit\n"
        "language:\n- en\n"
        "pipeline_tag: text-generation\n"
        "tags:\n- nlp\n- phi3\n- tiny-random\n- phi3ops-offline\n"
        "---\n\n"
    )


def _recipe_table(recipe: TinyPhi3Recipe, recipe_hash: str) -> str:
    rows = "".join(f"| {key} | {value} |\n" for key, value in asdict(recipe).items())
    return (
        "| recipe field | value |\n|---|---|\n"
        + rows
        + f"| parameters | {recipe.num_parameters:,} |\n"
        + f"| recipe hash | {recipe_hash} |\n"
    )


#: The ``LICENSE`` of both repos.
LICENSE = """\
MIT License

Copyright (c) phi3ops contributors. Tiny random test model; no weights of Microsoft's Phi-3.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
