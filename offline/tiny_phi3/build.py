"""Building the tiny Phi-3 repos: random weights, tokenizer, int4 ONNX model and manifest.

torch, transformers and onnxruntime-genai (through :mod:`tasks.onnx_build`) are imported only
when a build runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from offline.tiny_phi3.cards import LICENSE, onnx_model_card, pytorch_model_card
from offline.tiny_phi3.files import write_json, write_text
from offline.tiny_phi3.recipe import (
    ONNX_CPU_INT4_FILENAME,
    TINY,
    TinyPhi3Recipe,
    TinyPhi3Repos,
    build_code_version,
    library_versions,
)
from offline.tiny_phi3.tokenizer import STOP_TOKENS, save_tokenizer
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID
from tasks.onnx_build import build_onnx_int4

__all__ = ["MANIFEST_NAME", "build_tiny_phi3", "is_complete"]

#: Written last into a build's root: its presence marks a complete build.
MANIFEST_NAME = "tiny_phi3.json"
#: Recipes with more parameters than this get their weights written tensor by tensor
#: (`_save_weights_by_tensor`) instead of from a whole fp32 model in memory (15 GB at
#: Phi-3-mini's size); the smaller presets keep the bytes they always had.
STREAM_ABOVE_PARAMETERS = 1_000_000_000


def is_complete(root: Path) -> bool:
    """Whether ``root`` holds a complete build (its manifest exists)."""
    return (root / MANIFEST_NAME).is_file()


def build_tiny_phi3(root: Path, recipe: TinyPhi3Recipe = TINY) -> TinyPhi3Repos:
    """Build the tiny Phi-3 repositories into ``root`` (no caching, no atomicity).

    Prefer :func:`~offline.tiny_phi3.ensure_tiny_phi3`; this is its worker.

    Args:
        root: Empty or missing folder to build into.
        recipe: What to build.

    Returns:
        The paths of the built repositories.
    """
    repos = TinyPhi3Repos.at(Path(root), recipe)
    repos.pytorch_dir.mkdir(parents=True, exist_ok=True)
    token_ids = save_tokenizer(
        repos.pytorch_dir,
        vocab_size=recipe.tokenizer_vocab_size,
        max_vocab_size=recipe.model_vocab_size,
        model_max_length=recipe.max_position_embeddings,
    )
    _save_model(repos.pytorch_dir, recipe, token_ids)
    write_text(repos.pytorch_dir / "README.md", pytorch_model_card(recipe, repos.recipe_hash))
    write_text(repos.pytorch_dir / "LICENSE", LICENSE)
    _save_onnx(repos, recipe)
    manifest = {
        "build_code": build_code_version(),
        "libraries": library_versions(),
        "recipe": asdict(recipe),
        "recipe_hash": repos.recipe_hash,
        "repo_ids": [PYTORCH_REPO_ID, ONNX_REPO_ID],
        "onnx_cpu_int4_subfolder": ONNX_CPU_INT4_SUBFOLDER,
    }
    # transformers 5 writes safetensors shards owner-only (0600); hub downloads are readable
    # by all, and a local hub server or a container worker may run as another user.
    for path in repos.root.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    # Written last: its presence marks a complete build.
    write_json(repos.root / MANIFEST_NAME, manifest)
    return repos


def _save_model(pytorch_dir: Path, recipe: TinyPhi3Recipe, ids: dict[str, int]) -> None:
    """Save random Phi-3 weights (two safetensors shards) and the generation config."""
    # Imported here: building is rare, importing the package must stay light.
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=recipe.model_vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        # Equal to max_position_embeddings: the builder then picks Phi3MiniModel (no LongRoPE).
        original_max_position_embeddings=recipe.max_position_embeddings,
        sliding_window=min(2047, recipe.max_position_embeddings - 1),
        bos_token_id=ids["<s>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        architectures=["Phi3ForCausalLM"],
    )
    generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=[ids[token] for token in STOP_TOKENS],
        pad_token_id=ids["<|endoftext|>"],
    )
    if recipe.num_parameters > STREAM_ABOVE_PARAMETERS:
        _save_weights_by_tensor(pytorch_dir, recipe, config)
        config.dtype = recipe.dtype
        config.save_pretrained(str(pytorch_dir))
        generation_config.save_pretrained(str(pytorch_dir))
        return
    dtype = getattr(torch, recipe.dtype)
    # fork_rng: seed our weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Phi3ForCausalLM(config)
    model = model.to(dtype)
    model.config.dtype = recipe.dtype
    model.generation_config = generation_config
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # Two shards plus an index, like the real repo: each shard a bit over half the weights.
    model.save_pretrained(str(pytorch_dir), max_shard_size=total_bytes * 6 // 10)


def _save_weights_by_tensor(pytorch_dir: Path, recipe: TinyPhi3Recipe, config: object) -> None:
    """Write random weights as two safetensors shards and their index, one shard in memory
    at a time, each tensor drawn in the recipe's dtype (never a whole fp32 model).

    Drawn as Phi-3 initialises them: normal(0, ``initializer_range``) for the matrices and
    embeddings, ones for the RMSNorm weights (the only 1-D tensors). The names and shapes come
    from ``Phi3ForCausalLM`` built on the meta device (no memory).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        shapes = [
            (name, tuple(tensor.shape))
            for name, tensor in Phi3ForCausalLM(config).state_dict().items()  # type: ignore[arg-type]
        ]
    dtype = getattr(torch, recipe.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    sizes = [item * int(torch.Size(shape).numel()) for _, shape in shapes]
    total = sum(sizes)
    # Two shards, the first ending at the tensor that crosses half the bytes.
    first, running = len(shapes), 0
    for index, size in enumerate(sizes):
        running += size
        if running >= total // 2:
            first = index + 1
            break
    parts = [shapes[:first], shapes[first:]] if first < len(shapes) else [shapes]
    std = float(getattr(config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(recipe.seed)
    weight_map: dict[str, str] = {}
    for number, part in enumerate(parts, start=1):
        filename = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
        tensors = {}
        for name, shape in part:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = torch.empty(shape, dtype=dtype).normal_(
                    0.0, std, generator=generator
                )
            weight_map[name] = filename
        save_file(tensors, str(pytorch_dir / filename), metadata={"format": "pt"})
        del tensors
    write_json(
        pytorch_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _save_onnx(repos: TinyPhi3Repos, recipe: TinyPhi3Recipe) -> None:
    """Build the int4 CPU model and lay the ONNX repo out like the real one."""
    repos.onnx_model_dir.parent.mkdir(parents=True, exist_ok=True)
    build_onnx_int4(
        repos.pytorch_dir,
        repos.onnx_model_dir,
        execution_provider="cpu",
        block_size=32,
        accuracy_level=4,
        filename=ONNX_CPU_INT4_FILENAME,
    )
    # The builder re-saves the tokenizer in transformers 5's layout; the real ONNX repo
    # ships the same tokenizer files as the PyTorch repo, plus its config.json.
    (repos.onnx_model_dir / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(repos.pytorch_dir / name, repos.onnx_model_dir / name)
    shutil.copyfile(repos.pytorch_dir / "config.json", repos.onnx_model_dir / "config.json")
    # Like the published folder, added_tokens.json too. Its configuration_phi3.py (remote code)
    # is not mirrored: the folder is used as a model directly, and the served model refuses
    # code in its folder; fetch's skipping of .py files is tested with a hub repo of its own.
    # (Its tokenizer.model, a SentencePiece file, neither: nothing here writes one, and
    # tokenizer.json is what every loader reads.)
    added = json.loads((repos.pytorch_dir / "tokenizer.json").read_text())["added_tokens"]
    write_json(repos.onnx_model_dir / "added_tokens.json", {t["content"]: t["id"] for t in added})
    write_text(repos.onnx_dir / "README.md", onnx_model_card(recipe, repos.recipe_hash))
    write_text(repos.onnx_dir / "LICENSE", LICENSE)
