"""What a model folder may hold: the one check that fetch, packaging and the served model share."""

from __future__ import annotations

import json
import struct
import types
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


# --- JSON files are parsed once, with each key once -------------------------------------------

# Two session_options: Python's json keeps the last (clean) one, onnxruntime-genai applies the
# first, which loads a shared library saved under an allowed suffix.
DUPLICATE_SESSION_OPTIONS = """{"model": {"type": "phi3", "decoder": {
  "filename": "model.onnx",
  "session_options": {"custom_ops_library": "evil.onnx.data"},
  "session_options": {"log_id": "onnxruntime-genai", "provider_options": []}}}}"""


def test_a_genai_config_with_two_session_options_is_refused(tmp_path: Path) -> None:
    location = tmp_path / "genai_config.json"
    location.write_text(DUPLICATE_SESSION_OPTIONS)
    assert json.loads(DUPLICATE_SESSION_OPTIONS)["model"]["decoder"]["session_options"] == {
        "log_id": "onnxruntime-genai",
        "provider_options": [],
    }  # what a check that reads it with json.load alone sees
    problems = model_file_problems({"m/genai_config.json": str(location)})
    assert problems == [
        "m/genai_config.json: key model.decoder.session_options appears more than once "
        "(parsers disagree on which one counts: onnxruntime-genai reads the first, Python the "
        "last); keep one"
    ]


@pytest.mark.parametrize(
    ("name", "text", "key_path"),
    [
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []},'
            ' "added_tokens": [{"id": 0, "special": true, "content": "<s>", "content": "</s>"}]}',
            "added_tokens[0].content",
        ),
        ("tokenizer_config.json", '{"chat_template": "x", "chat_template": "y"}', "chat_template"),
        ("special_tokens_map.json", '{"a": {"b": {"c": {"d": 1, "d": 2}}}}', "a.b.c.d"),
        ("config.json", '{"model_type": "phi3", "auto_map": {}, "auto_map": {}}', "auto_map"),
    ],
)
def test_a_key_repeated_anywhere_in_any_json_file_is_refused(
    tmp_path: Path, name: str, text: str, key_path: str
) -> None:
    (tmp_path / name).write_text(text)
    [problem] = model_file_problems({f"m/{name}": str(tmp_path / name)})
    assert problem.startswith(f"m/{name}: key {key_path} appears more than once")


def test_a_json_file_that_is_not_json_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff{not json")
    [problem] = model_file_problems(
        {"tokenizer_config.json": str(tmp_path / "tokenizer_config.json")}
    )
    assert problem.startswith("tokenizer_config.json: not readable JSON")


# --- files are what their bytes are, not what their names say ----------------------------------


def _pe(offset: int = 0x80) -> bytes:
    header = bytearray(b"MZ" + bytes(offset + 200))
    struct.pack_into("<I", header, 0x3C, offset)
    header[offset : offset + 4] = b"PE\0\0"
    return bytes(header)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\x7fELF\x02\x01\x01" + bytes(100), "an ELF shared library or executable"),
        (b"\xfe\xed\xfa\xce" + bytes(100), "a Mach-O"),
        (b"\xfe\xed\xfa\xcf" + bytes(100), "a Mach-O"),
        (b"\xce\xfa\xed\xfe" + bytes(100), "a Mach-O"),
        (b"\xcf\xfa\xed\xfe" + bytes(100), "a Mach-O"),
        (b"\xca\xfe\xba\xbe" + bytes(100), "a Mach-O universal"),
        (_pe(), "a Windows (PE) DLL or executable"),
        (_pe(0x40), "a Windows (PE) DLL or executable"),
        (b"#!/bin/sh\nid\n", "a script"),
    ],
)
def test_executables_are_refused_by_their_bytes_whatever_their_name(
    tmp_path: Path, data: bytes, kind: str
) -> None:
    for name in ("evil.onnx.data", "model.safetensors", "README.md", "LICENSE"):
        (tmp_path / name).write_bytes(data)
        [problem] = model_file_problems({f"m/{name}": str(tmp_path / name)})
        assert problem.startswith(f"m/{name}: code ({kind}")


@pytest.mark.parametrize(
    "data",
    [
        b"MZ" + bytes(range(256)) * 4,  # "MZ" by chance; the offset at 0x3C points at no "PE"
        b"MZ\x00\x01",  # shorter than a PE header
        b"MZ" + bytes(0x3A) + struct.pack("<I", 10**9),  # an offset past the end of the file
        bytes(range(256)) * 4,
    ],
)
def test_weights_that_merely_start_with_mz_are_model_data(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "model.onnx.data").write_bytes(data)
    assert model_file_problems({"m/model.onnx.data": str(tmp_path / "model.onnx.data")}) == []


def test_the_served_model_refuses_a_duplicate_session_options_at_load(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from phi3_chat.model import MODEL_DIR_ARTIFACT, OnnxChatModel

    (tmp_path / "genai_config.json").write_text(DUPLICATE_SESSION_OPTIONS)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "evil.onnx.data").write_bytes(b"MZ" + bytes(100))  # not PE: data
    context = types.SimpleNamespace(artifacts={MODEL_DIR_ARTIFACT: str(tmp_path)}, model_config={})
    with pytest.raises(MlflowException) as info:
        OnnxChatModel().load_context(context)
    assert "genai_config.json: key model.decoder.session_options appears more than once" in str(
        info.value.message
    )
