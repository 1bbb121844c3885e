"""What a model folder may hold: the one check that fetch, packaging and the served model share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3_chat.folder import model_file_problems, model_folder_problems, usable_context

# What onnxruntime-genai 0.18's builder writes for a CPU Phi-3 (abridged), and the published
# Phi-3-mini-4k-instruct-onnx cpu-int4 config has the same session options.
BUILDER_CONFIG = {
    "model": {
        "bos_token_id": 1,
        "context_length": 4096,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx",
            "sliding_window": {"window_size": 2047, "slide_key_value_cache": False},
        },
        "eos_token_id": [32000, 32001, 32007],
        "type": "phi3",
    },
    "search": {"do_sample": False, "max_length": 4096, "top_k": 50},
}


@pytest.mark.parametrize(
    "path",
    [
        "cpu-int4/phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx",
        "cpu-int4/phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx.data",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer.json",
        "added_tokens.json",
        "chat_template.jinja",
        "merges.txt",
        "README.md",
        "LICENSE",
    ],
)
def test_the_files_of_a_phi3_repository_are_model_data(path: str) -> None:
    assert model_file_problems({path: None}) == []


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("cpu-int4/libcustom_ops.so", "code"),
        ("cpu-int4/libcustom_ops.so.1", "code"),
        ("onnxruntime_extensions.dll", "code"),
        ("libx.dylib", "code"),
        ("run.sh", "code"),
        ("modeling_phi3.py", "code"),
        ("pytorch_model.bin", "not a model file type"),
        ("weights.pkl", "not a model file type"),
        ("LICENSE.exe", "code"),
    ],
)
def test_anything_else_is_refused_naming_the_file(path: str, kind: str) -> None:
    [problem] = model_file_problems({path: None})
    assert problem.startswith(f"{path}: {kind}")


def _config(tmp_path: Path, config: object) -> dict[str, str | None]:
    location = tmp_path / "genai_config.json"
    location.write_text(json.dumps(config))
    return {"m/genai_config.json": str(location)}


def test_the_builder_config_is_accepted(tmp_path: Path) -> None:
    assert model_file_problems(_config(tmp_path, BUILDER_CONFIG)) == []


@pytest.mark.parametrize(
    ("session_options", "problem"),
    [
        (
            {"custom_ops_library": "libcustom_ops.so"},
            "model.decoder.session_options.custom_ops_library loads a shared library",
        ),
        (
            {"provider_options": [{"cuda": {}}]},
            "model.decoder.session_options.provider_options[0] names execution provider 'cuda'",
        ),
        (
            {"provider_options": [{"cpu": {}}, {"QNN": {"backend_path": "libQnnHtp.so"}}]},
            "model.decoder.session_options.provider_options[1] names execution provider 'QNN'",
        ),
        (
            {"enable_profiling": "/tmp/trace"},
            "model.decoder.session_options.enable_profiling is not an allowed session option",
        ),
        (
            {"ep.context_file_path": "/etc/cron.d/x"},
            "model.decoder.session_options.ep.context_file_path is not an allowed session option",
        ),
    ],
)
def test_settings_that_load_code_or_other_providers_are_refused_naming_the_key(
    tmp_path: Path, session_options: dict, problem: str
) -> None:
    config = json.loads(json.dumps(BUILDER_CONFIG))
    config["model"]["decoder"]["session_options"].update(session_options)
    problems = model_file_problems(_config(tmp_path, config))
    assert len(problems) == 1
    assert problems[0].startswith(f"m/genai_config.json: {problem}")


@pytest.mark.parametrize(
    "config",
    [
        {"custom_ops_library": "x.so"},  # anywhere in the file
        {"model": {"vision": {"session_options": {"CUSTOM_OPS_LIBRARY": "x.so"}}}},
        {"model": {"decoder": {"filename": "/usr/lib/model.onnx"}}},
        {"model": {"decoder": {"pipeline": [{"embeddings": {"filename": "../x.onnx"}}]}}},
        "not an object",
    ],
)
def test_code_and_paths_outside_the_folder_are_refused_anywhere(
    tmp_path: Path, config: object
) -> None:
    if config == "not an object":
        location = tmp_path / "genai_config.json"
        location.write_text("{not json")
        assert "not readable JSON" in model_file_problems({"genai_config.json": str(location)})[0]
        return
    assert model_file_problems(_config(tmp_path, config)) != []


def test_a_folder_is_checked_file_by_file_with_links_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "genai_config.json").write_text(json.dumps(BUILDER_CONFIG))
    (folder / "model.onnx").write_bytes(b"onnx")
    assert model_folder_problems(str(folder)) == []
    (folder / "sub" / "libevil.so").write_bytes(b"\x7fELF")
    (folder / "tokenizer.json").symlink_to("/etc/hostname")
    assert model_folder_problems(str(folder)) == [
        "tokenizer.json: a symbolic link (a model folder holds plain files only)",
        "sub/libevil.so: code (a shared library, executable or script)",
    ]


def test_the_context_served_is_the_published_4096_or_the_builders_2048() -> None:
    """The published folder's config has no sliding window and serves its 4096 tokens; a local
    int4 build declares a 2047-token window whose cache does not slide, and holds 2048.
    """
    built = BUILDER_CONFIG["model"]
    published = {
        **built,
        "decoder": {k: v for k, v in built["decoder"].items() if k != "sliding_window"},
    }
    assert usable_context(published) == 4096
    assert usable_context(built) == 2048
    sliding = {**built["decoder"]["sliding_window"], "slide_key_value_cache": True}
    assert (
        usable_context({**built, "decoder": {**built["decoder"], "sliding_window": sliding}})
        == 4096
    )
