"""build_onnx_int4's input checks and staging, with a fake builder: no model, no torch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from phi3ops.errors import InvalidInputError, OnnxBuildError
from tasks.onnx_build import (
    build_onnx_int4,
    build_onnx_int4_task,
    check_pytorch_phi3_dir,
    find_onnx_build,
)

BUILDER_MODULE = "onnxruntime_genai.models.builder"


@pytest.fixture
def phi3_dir(tmp_path: Path) -> Path:
    """A folder that passes the input checks (the files need not hold real weights)."""
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _write_build(folder: Path, filename: str = "model.onnx") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": filename}}})
    )
    (folder / filename).write_bytes(b"onnx")


class FakeBuilder:
    """Stands in for onnxruntime_genai.models.builder and records how it was called."""

    def __init__(self, on_create=None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.on_create = on_create or self.write_build
        self.filename = "model.onnx"

    def write_build(self, output_dir: str) -> None:
        _write_build(Path(output_dir), self.filename)

    def module(self) -> types.ModuleType:
        module = types.ModuleType(BUILDER_MODULE)
        module.parse_extra_options = self.parse_extra_options
        module.create_model = self.create_model
        return module

    def parse_extra_options(self, *args):
        self.calls.append(("parse", args))
        for option in args[-1]:
            key, _, value = option.partition("=")
            if key == "filename":
                self.filename = value
        return {"parsed": True}

    def create_model(self, model_name, input_path, output_dir, precision, ep, cache_dir, **kw):
        self.calls.append(("create", (model_name, input_path, output_dir, precision, ep, kw)))
        self.on_create(output_dir)


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    builder = FakeBuilder()
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, builder.module())
    return builder


def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# --- input checks -----------------------------------------------------------------------


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InvalidInputError, match="is not a folder") as excinfo:
        build_onnx_int4(missing, tmp_path / "out")
    assert str(missing) in str(excinfo.value)


def test_folder_without_config_is_rejected(phi3_dir: Path, tmp_path: Path) -> None:
    (phi3_dir / "config.json").unlink()
    with pytest.raises(InvalidInputError, match=r"no config\.json") as excinfo:
        build_onnx_int4(phi3_dir, tmp_path / "out")
    assert str(phi3_dir) in str(excinfo.value)
    assert "Download" in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_unparsable_config_is_rejected_with_its_cause(phi3_dir: Path) -> None:
    (phi3_dir / "config.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON") as excinfo:
        check_pytorch_phi3_dir(phi3_dir)
    assert isinstance(excinfo.value.__cause__, ValueError)


@pytest.mark.parametrize("config", [{"model_type": "llama"}, {}, ["phi3"]])
def test_non_phi3_config_is_rejected(phi3_dir: Path, config: object) -> None:
    (phi3_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="not 'phi3'"):
        check_pytorch_phi3_dir(phi3_dir)


def test_folder_without_safetensors_is_rejected(phi3_dir: Path) -> None:
    for shard in phi3_dir.glob("*.safetensors"):
        shard.unlink()
    (phi3_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"no \*\.safetensors"):
        check_pytorch_phi3_dir(phi3_dir)


def test_missing_shard_named_in_the_index_is_rejected(phi3_dir: Path) -> None:
    (phi3_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="model-00002-of-00002"):
        check_pytorch_phi3_dir(phi3_dir)


def test_folder_without_tokenizer_is_rejected(phi3_dir: Path) -> None:
    (phi3_dir / "tokenizer.json").unlink()
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        check_pytorch_phi3_dir(phi3_dir)


def test_valid_folder_returns_its_config(phi3_dir: Path) -> None:
    assert check_pytorch_phi3_dir(phi3_dir) == {"model_type": "phi3"}


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("execution_provider", "tpu"),
        ("block_size", 48),
        ("accuracy_level", 7),
        ("filename", "model.bin"),
        ("filename", "sub/model.onnx"),
    ],
)
def test_bad_options_are_rejected_before_building(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder, option: str, value: object
) -> None:
    with pytest.raises(InvalidInputError, match=option):
        build_onnx_int4(phi3_dir, tmp_path / "out", **{option: value})
    assert fake_builder.calls == []


# --- output handling ----------------------------------------------------------------------


def test_existing_build_is_returned_without_building(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    out = tmp_path / "out"
    _write_build(out, "custom.onnx")
    assert build_onnx_int4(phi3_dir, out) == out
    assert fake_builder.calls == []


def test_non_empty_folder_without_a_build_is_not_overwritten(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="no complete ONNX build"):
        build_onnx_int4(phi3_dir, out)
    assert (out / "notes.txt").read_text() == "mine"
    assert fake_builder.calls == []


def test_successful_build_is_moved_into_place(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    out = tmp_path / "models" / "onnx"
    result = build_onnx_int4(phi3_dir, out, block_size=64, accuracy_level=1, filename="m.onnx")

    assert result == out
    assert find_onnx_build(out) == out / "m.onnx"
    assert _leftovers(out.parent, {"onnx"}) == []
    (_, parse_args), (_, create_args) = fake_builder.calls
    model_name, input_path, _, precision, ep, _, extra = parse_args
    assert (model_name, input_path, precision, ep) == (None, str(phi3_dir), "int4", "cpu")
    # 0.18 ignores the int4_-prefixed option names: the plain ones must be used.
    assert "block_size=64" in extra and "accuracy_level=1" in extra
    assert "filename=m.onnx" in extra and "hf_token=false" in extra
    assert not any(option.startswith("int4_") for option in extra)
    assert create_args[-1] == {"parsed": True}


def test_empty_output_folder_is_filled(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert build_onnx_int4(phi3_dir, out) == out
    assert find_onnx_build(out) == out / "model.onnx"


def test_builder_error_is_wrapped_and_leaves_nothing(
    phi3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_write_then_fail(output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.onnx").write_bytes(b"half")
        raise ValueError("boom")

    builder = FakeBuilder(on_create=half_write_then_fail)
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, builder.module())
    out = tmp_path / "out"

    with pytest.raises(OnnxBuildError, match="boom") as excinfo:
        build_onnx_int4(phi3_dir, out)

    assert isinstance(excinfo.value.__cause__, ValueError)
    assert isinstance(excinfo.value, RuntimeError)
    assert not out.exists()
    assert _leftovers(tmp_path, {"phi3"}) == []


def test_builder_that_writes_nothing_is_an_error(
    phi3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = FakeBuilder(on_create=lambda output_dir: Path(output_dir).mkdir(parents=True))
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, builder.module())

    with pytest.raises(OnnxBuildError, match=r"without writing genai_config\.json"):
        build_onnx_int4(phi3_dir, tmp_path / "out")

    assert _leftovers(tmp_path, {"phi3"}) == []


def test_missing_builder_is_an_onnx_build_error(
    phi3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, None)  # makes the import fail

    with pytest.raises(OnnxBuildError, match="cannot be imported") as excinfo:
        build_onnx_int4(phi3_dir, tmp_path / "out")

    assert isinstance(excinfo.value.__cause__, ImportError)
    assert _leftovers(tmp_path, {"phi3"}) == []


def test_a_concurrent_finished_build_wins(
    phi3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def someone_else_finishes_first(output_dir: str) -> None:
        _write_build(out, "theirs.onnx")
        _write_build(Path(output_dir), "model.onnx")

    builder = FakeBuilder(on_create=someone_else_finishes_first)
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, builder.module())

    assert build_onnx_int4(phi3_dir, out) == out
    assert find_onnx_build(out) == out / "theirs.onnx"
    assert _leftovers(tmp_path, {"phi3", "out"}) == []


@pytest.mark.parametrize(
    "genai_config",
    ["not json", json.dumps({"model": {}}), json.dumps({"model": {"decoder": {"filename": 3}}})],
)
def test_find_onnx_build_rejects_broken_configs(tmp_path: Path, genai_config: str) -> None:
    (tmp_path / "genai_config.json").write_text(genai_config)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    assert find_onnx_build(tmp_path) is None


def test_task_wrapper_is_configured_for_a_non_transient_build() -> None:
    from prefect.cache_policies import NO_CACHE

    assert build_onnx_int4_task.name == "build-onnx-int4"
    assert build_onnx_int4_task.retries == 0
    assert build_onnx_int4_task.cache_policy is NO_CACHE


def test_task_wrapper_passes_its_options_through(
    phi3_dir: Path, tmp_path: Path, fake_builder: FakeBuilder
) -> None:
    # .fn is the undecorated function: no Prefect server needed.
    out = build_onnx_int4_task.fn(phi3_dir, tmp_path / "out", block_size=128, filename="x.onnx")

    assert out == tmp_path / "out"
    assert find_onnx_build(out) == out / "x.onnx"
    (_, parse_args), _ = fake_builder.calls
    assert "block_size=128" in parse_args[-1]


def test_builder_that_ignores_the_filename_is_an_error(
    phi3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = FakeBuilder(on_create=lambda output_dir: _write_build(Path(output_dir), "other.onnx"))
    monkeypatch.setitem(sys.modules, BUILDER_MODULE, builder.module())

    with pytest.raises(OnnxBuildError, match=r"wanted\.onnx"):
        build_onnx_int4(phi3_dir, tmp_path / "out", filename="wanted.onnx")

    assert _leftovers(tmp_path, {"phi3"}) == []
