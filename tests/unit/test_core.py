"""Settings, sources and errors: the small core every stage leans on."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from phi3ops import errors
from phi3ops.settings import Settings, get_settings
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, Variant

# The file list of microsoft/Phi-3-mini-4k-instruct-onnx (abridged) and -instruct, as published.
ONNX_REPO_FILES = [
    "README.md",
    "LICENSE",
    ".gitattributes",
    f"{ONNX_CPU_INT4_SUBFOLDER}/genai_config.json",
    f"{ONNX_CPU_INT4_SUBFOLDER}/phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx",
    f"{ONNX_CPU_INT4_SUBFOLDER}/phi3-mini-4k-instruct-cpu-int4-rtn-block-32-acc-level-4.onnx.data",
    f"{ONNX_CPU_INT4_SUBFOLDER}/tokenizer.json",
    "cuda/cuda-int4-rtn-block-32/genai_config.json",
    "directml/directml-int4-awq-block-128/model.onnx",
]
TORCH_REPO_FILES = [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "modeling_phi3.py",
    "sample_finetune.py",
    ".gitattributes",
]


def _selected(variant: Variant, files: list[str]) -> set[str]:
    return {f for f in files if any(fnmatch.fnmatchcase(f, p) for p in variant.allow_patterns)}


def test_onnx_variant_selects_only_the_cpu_int4_folder() -> None:
    chosen = _selected(Variant.ONNX_CPU_INT4, ONNX_REPO_FILES)
    assert chosen == {"README.md", "LICENSE"} | {
        f for f in ONNX_REPO_FILES if f.startswith(ONNX_CPU_INT4_SUBFOLDER)
    }
    assert Variant.ONNX_CPU_INT4.subfolder == ONNX_CPU_INT4_SUBFOLDER
    assert Variant.ONNX_CPU_INT4.default_repo_id == "microsoft/Phi-3-mini-4k-instruct-onnx"


def test_pytorch_variant_selects_weights_configs_and_tokenizer_not_code() -> None:
    chosen = _selected(Variant.PYTORCH, TORCH_REPO_FILES)
    assert chosen == {
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    assert Variant.PYTORCH.subfolder == ""


def test_variant_parses_from_cli_strings() -> None:
    assert Variant("onnx-cpu-int4") is Variant.ONNX_CPU_INT4
    with pytest.raises(ValueError, match="onnx-gpu"):
        Variant("onnx-gpu")


def test_settings_read_env_and_resolve_paths(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PHI3OPS_DATA_DIR", "relative/dir")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.data_dir == tmp_path / "relative" / "dir"
    assert settings.snapshots_dir == settings.data_dir / "snapshots"
    assert not settings.data_dir.exists()  # reading settings writes nothing


def test_settings_reject_bad_values(monkeypatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("PHI3OPS_DISK_HEADROOM_BYTES", "-1")
    with pytest.raises(ValidationError, match="disk_headroom_bytes"):
        Settings()


def test_get_settings_is_cached_until_cleared(monkeypatch, tmp_path: Path) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(tmp_path / "other"))
    get_settings.cache_clear()
    assert get_settings().data_dir == tmp_path / "other"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.RepoNotFoundError, LookupError),
        (errors.HubAccessDeniedError, PermissionError),
        (errors.HubUnreachableError, ConnectionError),
        (errors.TransientHubError, ConnectionError),
        (errors.IntegrityError, ValueError),
        (errors.InsufficientDiskSpaceError, OSError),
        (errors.InvalidInputError, ValueError),
        (errors.OnnxBuildError, RuntimeError),
    ],
)
def test_errors_subclass_the_nearest_builtin(cls: type, builtin: type) -> None:
    assert issubclass(cls, builtin)
    assert issubclass(cls, errors.Phi3OpsError)


def test_only_transient_errors_are_retried() -> None:
    from tasks.hub import is_transient

    assert is_transient(errors.TransientHubError("503"))
    for exc in (
        errors.IntegrityError("bad bytes"),
        errors.HubAccessDeniedError("gated"),
        errors.HubUnreachableError("offline"),
        errors.RepoNotFoundError("nope"),
        ValueError("x"),
    ):
        assert not is_transient(exc)


def test_manifest_digest_is_order_independent_and_content_sensitive() -> None:
    from tasks.hub import ManifestEntry, manifest_digest

    a = ManifestEntry(path="a", size=1, sha256="0" * 64)
    b = ManifestEntry(path="b", size=2, sha256="1" * 64)
    assert manifest_digest("o/r", "f" * 40, [a, b]) == manifest_digest("o/r", "f" * 40, [b, a])
    changed = b.model_copy(update={"sha256": "2" * 64})
    assert manifest_digest("o/r", "f" * 40, [a, b]) != manifest_digest(
        "o/r", "f" * 40, [a, changed]
    )
    assert manifest_digest("o/r", "f" * 40, [a]) != manifest_digest("o/r", "e" * 40, [a])


@pytest.mark.parametrize(
    ("repo_id", "flavor", "quantization", "expected"),
    [
        (
            "microsoft/Phi-3-mini-4k-instruct-onnx",
            "onnx",
            "int4-rtn-block-32-acc-level-4",
            "phi-3-mini-4k-instruct-onnx-int4",
        ),
        (
            "microsoft/Phi-3-mini-4k-instruct",
            "onnx",
            "int4-default-block-32-acc-level-4",
            "phi-3-mini-4k-instruct-onnx-int4",
        ),
        (
            "microsoft/Phi-3-mini-4k-instruct",
            "transformers",
            "",
            "phi-3-mini-4k-instruct-transformers",
        ),
        ("org/Phi-3.5-mini:v1", "transformers", "", "phi-3-5-mini-v1-transformers"),
        ("org/Phi-3.5-mini:v1", "onnx", "int4", "phi-3-5-mini-v1-onnx-int4"),
    ],
)
def test_logged_model_names_say_what_the_model_is_and_mlflow_accepts_them(
    repo_id: str, flavor: str, quantization: str, expected: str
) -> None:
    from mlflow.utils.validation import _validate_logged_model_name

    from phi3ops.names import logged_model_name

    name = logged_model_name(repo_id, flavor, quantization)
    assert name == expected
    _validate_logged_model_name(name)  # MLflow rejects / : . % " ' in logged model names


def test_configure_tracking_survives_another_process_creating_the_experiment(monkeypatch) -> None:
    """Two server workers start at once: the second to create the experiment must use it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

    from phi3ops.tracking import configure_tracking

    create = mlflow.create_experiment

    def lose_the_race(name, **kwargs):
        create(name, **kwargs)  # the other process wins...
        raise MlflowException(f"Experiment {name!r} already exists.", RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(mlflow, "create_experiment", lose_the_race)
    experiment_id = configure_tracking("raced")
    assert mlflow.get_experiment_by_name("raced").experiment_id == experiment_id
