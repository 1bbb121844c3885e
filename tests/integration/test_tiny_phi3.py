"""The tiny random Phi-3: layout, determinism, caching, and that real runtimes load it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline.tiny_phi3 import (
    BENCH,
    ONNX_CPU_INT4_FILENAME,
    ONNX_CPU_INT4_SUBFOLDER,
    ONNX_REPO_ID,
    PYTORCH_REPO_ID,
    TINY,
    TinyPhi3Repos,
    ensure_tiny_phi3,
)
from phi3ops.errors import InvalidInputError, OnnxBuildError
from tasks.onnx_build import build_onnx_int4

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
EXPECTED_PROMPT = (
    "<|system|>\nYou are a helpful assistant.<|end|>\n"
    "<|user|>\nWhat is the capital of France?<|end|>\n"
    "<|assistant|>\n"
)


def _file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(path): path.stat().st_mtime_ns for path in root.rglob("*")}


def _special_ids(pytorch_dir: Path) -> dict[str, int]:
    config = json.loads((pytorch_dir / "tokenizer_config.json").read_text())
    return {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}


# --- layout ------------------------------------------------------------------------------


def test_repos_are_laid_out_like_the_hub_repos(tiny_phi3: TinyPhi3Repos) -> None:
    assert tiny_phi3.pytorch_dir == tiny_phi3.root / PYTORCH_REPO_ID
    assert tiny_phi3.onnx_dir == tiny_phi3.root / ONNX_REPO_ID
    assert tiny_phi3.onnx_model_dir == tiny_phi3.onnx_dir / ONNX_CPU_INT4_SUBFOLDER

    pytorch_files = {p.name for p in tiny_phi3.pytorch_dir.iterdir()}
    assert pytorch_files == {
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "LICENSE",
    }
    index = json.loads((tiny_phi3.pytorch_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_parameters"] == TINY.num_parameters
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in tiny_phi3.root.rglob("*.safetensors"))

    onnx_files = {p.name for p in tiny_phi3.onnx_model_dir.iterdir()}
    assert {
        "genai_config.json",
        ONNX_CPU_INT4_FILENAME,
        ONNX_CPU_INT4_FILENAME + ".data",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
        "added_tokens.json",
    } == onnx_files
    added = json.loads((tiny_phi3.onnx_model_dir / "added_tokens.json").read_text())
    assert added["<|assistant|>"] == added["<|endoftext|>"] + 1
    assert (tiny_phi3.onnx_dir / "README.md").is_file()
    assert (tiny_phi3.onnx_dir / "LICENSE").is_file()
    genai = json.loads((tiny_phi3.onnx_model_dir / "genai_config.json").read_text())
    assert genai["model"]["type"] == "phi3"
    assert genai["model"]["decoder"]["filename"] == ONNX_CPU_INT4_FILENAME
    assert genai["model"]["context_length"] == 4096


def test_config_and_special_tokens_match_phi3(tiny_phi3: TinyPhi3Repos) -> None:
    config = json.loads((tiny_phi3.pytorch_dir / "config.json").read_text())
    assert config["model_type"] == "phi3"
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert config["max_position_embeddings"] == config["original_max_position_embeddings"]
    assert config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == TINY.model_vocab_size
    assert config["hidden_size"] % 32 == 0 and config["intermediate_size"] % 32 == 0

    ids = _special_ids(tiny_phi3.pytorch_dir)
    # Same order as Phi-3: <unk> <s> </s> open the vocabulary, the chat markers follow it.
    assert (ids["<unk>"], ids["<s>"], ids["</s>"]) == (0, 1, 2)
    assert ids["<|assistant|>"] == ids["<|endoftext|>"] + 1
    assert ids["<|user|>"] == ids["<|endoftext|>"] + 10
    assert config["bos_token_id"] == ids["<s>"]
    assert config["eos_token_id"] == config["pad_token_id"] == ids["<|endoftext|>"]

    generation = json.loads((tiny_phi3.pytorch_dir / "generation_config.json").read_text())
    # Phi-3 stops on <|endoftext|>, <|assistant|> and <|end|> ([32000, 32001, 32007]).
    assert generation["eos_token_id"] == [
        ids["<|endoftext|>"],
        ids["<|assistant|>"],
        ids["<|end|>"],
    ]

    tokenizer_config = json.loads((tiny_phi3.pytorch_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|endoftext|>"
    assert "<|assistant|>\\n" in json.dumps(tokenizer_config["chat_template"])
    tokenizer = json.loads((tiny_phi3.pytorch_dir / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert tokenizer["pre_tokenizer"]["type"] == "ByteLevel"


def test_bench_recipe_has_about_200m_parameters() -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=BENCH.model_vocab_size,
        hidden_size=BENCH.hidden_size,
        intermediate_size=BENCH.intermediate_size,
        num_hidden_layers=BENCH.num_hidden_layers,
        num_attention_heads=BENCH.num_attention_heads,
        num_key_value_heads=BENCH.num_key_value_heads,
        tie_word_embeddings=False,
        eos_token_id=0,  # the 32000 defaults lie outside this vocabulary
        pad_token_id=0,
    )
    with torch.device("meta"):  # shapes only: no 200M-parameter allocation
        model = Phi3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == BENCH.num_parameters


# --- determinism and caching -------------------------------------------------------------


def test_same_recipe_builds_identical_bytes(tiny_phi3: TinyPhi3Repos, tmp_path: Path) -> None:
    # Two fresh processes, as on two machines. (A second build inside a long-lived process that
    # already ran the builder can serialise the ONNX graph in another order; weights match.)
    roots = []
    for name in ("one", "two"):
        subprocess.run(
            [sys.executable, "-m", "offline.tiny_phi3", str(tmp_path / name)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        roots.append(tmp_path / name / tiny_phi3.recipe_hash)
    first, second = _file_digests(roots[0]), _file_digests(roots[1])
    assert len(first) >= 19
    assert first == second


def test_second_ensure_reuses_the_cache(tiny_phi3: TinyPhi3Repos) -> None:
    cache_root = tiny_phi3.root.parent
    before = _mtimes(tiny_phi3.root)

    again = ensure_tiny_phi3(cache_root, TINY)

    assert again == tiny_phi3
    assert _mtimes(tiny_phi3.root) == before  # nothing rebuilt or rewritten
    # No staging folders left behind by the first build.
    assert not [p for p in cache_root.iterdir() if ".building-" in p.name]


# --- the real runtimes load it ------------------------------------------------------------


def test_transformers_loads_it_and_applies_the_phi3_chat_template(
    tiny_phi3: TinyPhi3Repos,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3.pytorch_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT
    closed = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert closed.endswith("<|end|>\n<|endoftext|>")

    ids = _special_ids(tiny_phi3.pytorch_dir)
    encoded = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    # Chat markers are single tokens, and no BOS is added (add_bos_token false, as Phi-3).
    assert encoded[0] == ids["<|system|>"]
    assert encoded[-1] == ids["<|assistant|>"]
    assert encoded.count(ids["<|end|>"]) == 2
    text = "Byte-level BPE round-trips anything: café, 東京, emoji 🙂."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    model = AutoModelForCausalLM.from_pretrained(tiny_phi3.pytorch_dir)
    assert model.config.model_type == "phi3"
    input_ids = torch.tensor([encoded])
    output = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > input_ids.shape[1]


def test_onnxruntime_genai_loads_it_and_generates(tiny_phi3: TinyPhi3Repos) -> None:
    import onnxruntime_genai as og

    model = og.Model(str(tiny_phi3.onnx_model_dir))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT
    input_ids = tokenizer.encode(prompt)

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_ids) + 8)  # max_length counts the prompt
    generator = og.Generator(model, params)
    generator.append_tokens(input_ids)
    while not generator.is_done():
        generator.generate_next_token()
    sequence = list(generator.get_sequence(0))

    assert sequence[: len(input_ids)] == list(input_ids)
    new_tokens = sequence[len(input_ids) :]
    assert new_tokens
    assert all(0 <= token < TINY.model_vocab_size for token in new_tokens)
    assert isinstance(tokenizer.decode(new_tokens), str)


# --- build_onnx_int4 on a real checkpoint -------------------------------------------------


def test_build_onnx_int4_returns_an_existing_build_untouched(tiny_phi3: TinyPhi3Repos) -> None:
    before = _mtimes(tiny_phi3.onnx_model_dir)

    result = build_onnx_int4(
        tiny_phi3.pytorch_dir, tiny_phi3.onnx_model_dir, filename=ONNX_CPU_INT4_FILENAME
    )

    assert result == tiny_phi3.onnx_model_dir
    assert _mtimes(tiny_phi3.onnx_model_dir) == before


def test_build_onnx_int4_honours_block_size(tiny_phi3: TinyPhi3Repos, tmp_path: Path) -> None:
    import onnx_ir as ir

    # Guards the 0.18 gotcha: the builder ignores `int4_block_size`, only `block_size` counts.
    out = build_onnx_int4(tiny_phi3.pytorch_dir, tmp_path / "onnx-b64", block_size=64)

    graph = ir.load(out / "model.onnx").graph
    nbits = [node for node in graph if node.op_type == "MatMulNBits"]
    assert nbits
    assert {node.attributes["block_size"].value for node in nbits} == {64}
    assert {node.attributes["accuracy_level"].value for node in nbits} == {4}


def test_build_onnx_int4_rejects_a_folder_without_config(
    tiny_phi3: TinyPhi3Repos, tmp_path: Path
) -> None:
    broken = tmp_path / "no-config"
    shutil.copytree(tiny_phi3.pytorch_dir, broken)
    (broken / "config.json").unlink()

    with pytest.raises(InvalidInputError, match=r"no config\.json") as excinfo:
        build_onnx_int4(broken, tmp_path / "out")

    assert str(broken) in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_builder_failure_leaves_no_output(tiny_phi3: TinyPhi3Repos, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_phi3.pytorch_dir, corrupt)
    for shard in corrupt.glob("*.safetensors"):
        shard.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"

    with pytest.raises(OnnxBuildError, match="builder failed") as excinfo:
        build_onnx_int4(corrupt, out)

    assert excinfo.value.__cause__ is not None
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]
