"""Tiny Phi-3 recipes and the build cache's bookkeeping, with a fake build: no model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offline import tiny_phi3
from offline.tiny_phi3 import (
    BENCH,
    MINI,
    ONNX_CPU_INT4_SUBFOLDER,
    ONNX_REPO_ID,
    PRESETS,
    PYTORCH_REPO_ID,
    TINY,
    TinyPhi3Recipe,
    ensure_tiny_phi3,
)
from phi3ops.errors import InvalidInputError


def test_repo_constants_name_the_real_repos() -> None:
    assert PYTORCH_REPO_ID == "microsoft/Phi-3-mini-4k-instruct"
    assert ONNX_REPO_ID == "microsoft/Phi-3-mini-4k-instruct-onnx"
    assert ONNX_CPU_INT4_SUBFOLDER == "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"


def test_presets() -> None:
    assert PRESETS == {"tiny": TINY, "bench": BENCH, "mini": MINI}
    # Trained vocabulary + 11 Phi-3 added tokens, padded to a multiple of 64 like Phi-3.
    assert TINY.model_vocab_size == 1024
    assert TINY.max_position_embeddings == BENCH.max_position_embeddings == 4096
    assert TINY.num_parameters < 1_000_000
    assert 180_000_000 < BENCH.num_parameters < 230_000_000


def test_mini_preset_has_phi3_minis_shape() -> None:
    # microsoft/Phi-3-mini-4k-instruct's config.json.
    assert (MINI.hidden_size, MINI.intermediate_size) == (3072, 8192)
    assert (MINI.num_hidden_layers, MINI.num_attention_heads, MINI.num_key_value_heads) == (
        32,
        32,
        32,
    )
    assert MINI.max_position_embeddings == 4096
    assert MINI.dtype == "bfloat16"
    assert MINI.model_vocab_size == 32064  # Phi-3's padded vocabulary, not the tokenizer's
    # 3.82B: 2 x 32064 x 3072 (embeddings, LM head) + 32 x 113.2M (layers) + 3072.
    assert MINI.num_parameters == 3_821_079_552
    assert 7.6e9 < MINI.weight_bytes < 7.7e9  # bf16


def test_kv_bytes_per_token_match_the_servers_arithmetic() -> None:
    from phi3_chat.admission import kv_bytes_per_token

    # 32 layers x 32 KV heads x 96 head size x 2 (K, V) x 4 bytes (fp32 KV cache on CPU).
    assert MINI.kv_bytes_per_token == 786_432
    for recipe in (TINY, BENCH, MINI):
        decoder = {
            "num_hidden_layers": recipe.num_hidden_layers,
            "num_attention_heads": recipe.num_attention_heads,
            "num_key_value_heads": recipe.num_key_value_heads,
            "hidden_size": recipe.hidden_size,
        }
        assert kv_bytes_per_token({"decoder": decoder}) == recipe.kv_bytes_per_token


def test_min_vocab_rows_only_ever_adds_rows() -> None:
    assert dataclasses.replace(TINY, min_vocab_rows=10).model_vocab_size == TINY.model_vocab_size
    assert dataclasses.replace(TINY, min_vocab_rows=2000).model_vocab_size == 2048
    assert dataclasses.replace(TINY, min_vocab_rows=2000).cache_key() != TINY.cache_key()


@pytest.mark.parametrize(
    "changes",
    [
        {"hidden_size": 48},
        {"intermediate_size": 100},
        {"num_attention_heads": 3},
        {"num_attention_heads": 64},  # head size 1: odd, rotary needs even
        {"num_key_value_heads": 3},
        {"tokenizer_vocab_size": 100},
        {"num_hidden_layers": 0},
        {"dtype": "int8"},
        {"min_vocab_rows": -1},
    ],
)
def test_invalid_recipes_are_rejected(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError, match="invalid TinyPhi3Recipe"):
        dataclasses.replace(TINY, **changes)


def test_recipes_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.seed = 1  # type: ignore[misc]


def test_cache_key_is_stable_and_tracks_the_recipe() -> None:
    key = TINY.cache_key()
    assert key == TinyPhi3Recipe().cache_key()
    assert len(key) == 16 and int(key, 16) >= 0
    assert dataclasses.replace(TINY, seed=1).cache_key() != key
    assert BENCH.cache_key() != key
    assert MINI.cache_key() not in (key, BENCH.cache_key())


def test_import_touches_nothing_heavy() -> None:
    # Prefect comes with the ONNX build task the builder uses; the model libraries load only
    # when a build runs.
    code = (
        "import sys, offline.tiny_phi3; "
        "heavy = {'torch', 'transformers', 'tokenizers', 'onnxruntime_genai'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- ensure_tiny_phi3 with a fake build ---------------------------------------------------


def _fake_build(root: Path, recipe: TinyPhi3Recipe = TINY) -> tiny_phi3.TinyPhi3Repos:
    repos = tiny_phi3.TinyPhi3Repos.at(Path(root), recipe)
    repos.pytorch_dir.mkdir(parents=True)
    (repos.pytorch_dir / "config.json").write_text("{}")
    (repos.root / "tiny_phi3.json").write_text(json.dumps({"recipe_hash": repos.recipe_hash}))
    return repos


def test_ensure_builds_into_the_recipe_hash_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", _fake_build)

    repos = ensure_tiny_phi3(tmp_path / "cache")

    assert repos.root == tmp_path / "cache" / TINY.cache_key()
    assert repos.pytorch_dir == repos.root / PYTORCH_REPO_ID
    assert repos.onnx_model_dir == repos.root / ONNX_REPO_ID / ONNX_CPU_INT4_SUBFOLDER
    assert (repos.pytorch_dir / "config.json").is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if ".building-" in p.name]


def test_ensure_reuses_a_complete_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", _fake_build)
    first = ensure_tiny_phi3(tmp_path)

    def must_not_build(*args: object) -> None:
        raise AssertionError("rebuilt a cached recipe")

    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", must_not_build)
    assert ensure_tiny_phi3(tmp_path) == first


def test_failed_build_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build_then_fail(root: Path, recipe: TinyPhi3Recipe) -> None:
        (Path(root) / PYTORCH_REPO_ID).mkdir(parents=True)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", half_build_then_fail)

    with pytest.raises(RuntimeError, match="interrupted"):
        ensure_tiny_phi3(tmp_path)

    # Only the lock file stays; the next call builds from scratch.
    assert [p.name for p in tmp_path.iterdir()] == [f".{TINY.cache_key()}.lock"]
    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", _fake_build)
    assert (ensure_tiny_phi3(tmp_path).root / "tiny_phi3.json").is_file()


def test_incomplete_leftover_folder_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / TINY.cache_key() / "junk").mkdir(parents=True)
    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", _fake_build)

    repos = ensure_tiny_phi3(tmp_path)

    assert not (repos.root / "junk").exists()
    assert (repos.root / "tiny_phi3.json").is_file()


def test_cache_root_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(InvalidInputError, match="is a file"):
        ensure_tiny_phi3(a_file)


def test_cli_prints_the_repo_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tiny_phi3, "build_tiny_phi3", _fake_build)

    assert tiny_phi3.main([str(tmp_path), "--preset", "tiny"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["recipe_hash"] == TINY.cache_key()
    assert printed[PYTORCH_REPO_ID] == str(tmp_path / TINY.cache_key() / PYTORCH_REPO_ID)
