"""Package plans and lineage tags, without a model: flavors, requirements, keys, names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.names import TAG_PREFIX, LineageTag
from phi3ops.registry import resolve_model_name
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant
from tasks.hub import FetchResult
from tasks.packaging import (
    lineage_tags,
    package_key,
    pinned_requirements,
    plan_package,
    quantization_of,
    requirements_digest,
    wrapper_version,
)

SHA_A = "a" * 40
SHA_B = "b" * 40


def _fake_onnx_snapshot(root: Path, sha: str = SHA_A) -> FetchResult:
    local = root / "onnx" / sha
    model_dir = local / ONNX_CPU_INT4_SUBFOLDER
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"onnx")
    (model_dir / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": "model.onnx"}}})
    )
    return _result(local, model_dir, ONNX_REPO_ID, sha, Variant.ONNX_CPU_INT4)


def _fake_pytorch_snapshot(root: Path, sha: str = SHA_A, dtype: str = "bfloat16") -> FetchResult:
    local = root / "pytorch" / sha
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "phi3", "dtype": dtype}))
    (local / "model.safetensors").write_bytes(b"weights")
    (local / "tokenizer.json").write_text("{}")
    return _result(local, local, PYTORCH_REPO_ID, sha, Variant.PYTORCH)


def _result(local: Path, model_dir: Path, repo: str, sha: str, variant: Variant) -> FetchResult:
    return FetchResult(
        local_dir=local,
        model_dir=model_dir,
        repo_id=repo,
        revision="main",
        commit_sha=sha,
        variant=variant,
        manifest_digest=f"digest-of-{sha[:4]}",
        total_bytes=10,
        downloaded_bytes=10,
        file_count=3,
    )


# --- requirements -------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", list(Flavor))
def test_requirements_are_exact_pins_without_local_labels(flavor: Flavor) -> None:
    pins = pinned_requirements(flavor)
    assert pins == sorted(pins)
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", pin) for pin in pins), pins
    names = {pin.split("==")[0] for pin in pins}
    assert {"mlflow", "numpy", "pandas"} <= names
    if flavor is Flavor.ONNX:
        assert {"onnxruntime-genai", "onnxruntime"} <= names
        assert "torch" not in names
    else:
        assert {"transformers", "torch", "tokenizers"} <= names
        # torch==2.13.0 (not 2.13.0+cpu, which no public index has) still matches the CPU build.
        assert not any("+" in pin for pin in pins)


def test_requirements_digest_ignores_order_case_and_blanks() -> None:
    a = requirements_digest(["numpy==2.0", "mlflow==3.17.2"])
    assert a == requirements_digest(["MLflow==3.17.2", "numpy==2.0", " "])
    assert a != requirements_digest(["numpy==2.0", "mlflow==3.17.3"])
    assert re.fullmatch(r"[0-9a-f]{64}", a)


def test_wrapper_versions() -> None:
    onnx = wrapper_version(Flavor.ONNX)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", onnx)
    assert wrapper_version(Flavor.TRANSFORMERS).startswith("mlflow==3.")
    assert ";transformers==" in wrapper_version(Flavor.TRANSFORMERS)


# --- plans ---------------------------------------------------------------------------------------


def test_onnx_plan_of_the_published_int4_variant(tmp_path: Path) -> None:
    fetched = _fake_onnx_snapshot(tmp_path)
    plan = plan_package(fetched, "onnx")
    assert plan.flavor is Flavor.ONNX
    assert plan.weights_dir == fetched.model_dir
    assert plan.quantization == "int4-rtn-block-32-acc-level-4"
    assert plan.inference_config["model_name"] == ONNX_REPO_ID
    assert plan.requirements_digest == requirements_digest(plan.pip_requirements)
    named = plan_package(fetched, Flavor.ONNX, model_name_for_response="phi3")
    assert named.inference_config["model_name"] == "phi3"
    assert named.package_key != plan.package_key  # it answers differently


def test_onnx_plan_of_a_local_build(tmp_path: Path) -> None:
    fetched = _fake_pytorch_snapshot(tmp_path)
    build = _fake_onnx_snapshot(tmp_path / "build").model_dir
    built = fetched.model_copy(update={"model_dir": build})
    plan = plan_package(built, Flavor.ONNX)
    assert plan.weights_dir == build
    assert plan.quantization == "int4-default-block-32-acc-level-4"


def test_transformers_plan_uses_the_checkpoint_dtype_and_greedy_decoding(tmp_path: Path) -> None:
    fetched = _fake_pytorch_snapshot(tmp_path, dtype="float16")
    plan = plan_package(fetched, Flavor.TRANSFORMERS)
    assert plan.weights_dir == fetched.local_dir
    assert plan.quantization == "float16"
    assert plan.inference_config["do_sample"] is False  # what makes temperature=0.0 work
    assert quantization_of(fetched, Flavor.TRANSFORMERS) == "float16"


def test_transformers_plan_falls_back_to_torch_dtype_key(tmp_path: Path) -> None:
    fetched = _fake_pytorch_snapshot(tmp_path)
    (fetched.local_dir / "config.json").write_text(
        json.dumps({"model_type": "phi3", "torch_dtype": "bfloat16"})
    )
    assert plan_package(fetched, Flavor.TRANSFORMERS).quantization == "bfloat16"


def test_transformers_flavor_refuses_onnx_snapshots(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"needs PyTorch weights.*variant 'pytorch'"):
        plan_package(_fake_onnx_snapshot(tmp_path), Flavor.TRANSFORMERS)


def test_onnx_flavor_refuses_unbuilt_pytorch_snapshots(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"needs an ONNX int4 build.*build_onnx=True"):
        plan_package(_fake_pytorch_snapshot(tmp_path), Flavor.ONNX)


def test_model_name_for_response_is_onnx_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="onnx flavor only"):
        plan_package(
            _fake_pytorch_snapshot(tmp_path), Flavor.TRANSFORMERS, model_name_for_response="x"
        )


def test_package_key_changes_with_source_and_packaging(tmp_path: Path) -> None:
    a = _fake_onnx_snapshot(tmp_path / "a", SHA_A)
    b = _fake_onnx_snapshot(tmp_path / "b", SHA_B)
    assert plan_package(a, Flavor.ONNX).package_key == plan_package(a, Flavor.ONNX).package_key
    assert plan_package(a, Flavor.ONNX).package_key != plan_package(b, Flavor.ONNX).package_key
    base = {
        "flavor": Flavor.ONNX,
        "quantization": "q",
        "wrapper_version": "w",
        "requirements_digest": "r",
        "model_config": {"max_tokens": 1},
    }
    key = package_key(a, **base)
    for field, other in [
        ("flavor", Flavor.TRANSFORMERS),
        ("quantization", "q2"),
        ("wrapper_version", "w2"),
        ("requirements_digest", "r2"),
        ("model_config", {"max_tokens": 2}),
    ]:
        assert package_key(a, **{**base, field: other}) != key, field
    # The path on this machine is not part of what the package is.
    moved = a.model_copy(update={"local_dir": Path("/elsewhere"), "model_dir": Path("/x")})
    assert package_key(moved, **base) == key


# --- tags -----------------------------------------------------------------------------------------


def test_lineage_tags_are_prefixed_strings_naming_the_source(tmp_path: Path) -> None:
    fetched = _fake_onnx_snapshot(tmp_path)
    plan = plan_package(fetched, Flavor.ONNX)
    tags = lineage_tags(fetched, plan)
    assert set(tags) == {tag.value for tag in LineageTag}
    assert all(key.startswith(TAG_PREFIX) for key in tags)
    assert all(isinstance(value, str) and value for value in tags.values())
    assert tags[LineageTag.SOURCE_REPO] == ONNX_REPO_ID
    assert tags[LineageTag.COMMIT_SHA] == SHA_A
    assert tags[LineageTag.MANIFEST_DIGEST] == fetched.manifest_digest
    assert tags[LineageTag.VARIANT] == "onnx-cpu-int4"
    assert tags[LineageTag.FLAVOR] == "onnx"
    assert tags[LineageTag.QUANTIZATION] == "int4-rtn-block-32-acc-level-4"
    assert tags[LineageTag.WRAPPER_VERSION] == plan.wrapper_version
    assert tags[LineageTag.PIP_REQUIREMENTS_DIGEST] == plan.requirements_digest
    assert tags[LineageTag.PACKAGE_KEY] == plan.package_key


# --- registered model names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["phi3-mini", "Phi3_mini.v2", "catalog.schema.phi3", "m"])
def test_valid_model_names(name: str) -> None:
    assert resolve_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", " ", "a/b", "a:b", "phi3@candidate", "-x", "has space", "x" * 257, "ü"]
)
def test_invalid_model_names_say_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidInputError, match=r"letters, digits.*--model-name"):
        resolve_model_name(name)


def test_model_name_defaults_to_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi3ops.settings import get_settings

    assert resolve_model_name() == "phi3-mini"
    monkeypatch.setenv("PHI3OPS_REGISTERED_MODEL_NAME", "bad/name")
    get_settings.cache_clear()
    with pytest.raises(InvalidInputError, match="PHI3OPS_REGISTERED_MODEL_NAME"):
        resolve_model_name()


def test_each_flavor_has_a_default_variant() -> None:
    for flavor in Flavor:
        assert flavor.default_variant in Variant
    assert Flavor.TRANSFORMERS.default_variant is Variant.PYTORCH
    assert Flavor.ONNX.default_variant is Variant.ONNX_CPU_INT4
