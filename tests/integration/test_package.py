"""The package flow end to end on the tiny Phi-3: local hub -> fetch -> MLflow model -> registry.

One module-scoped store is packaged once, in the order a user would go:

1. ``onnx`` from the ONNX repo (version 1, @candidate), then predicted through @candidate;
2. ``transformers`` from the (gated) PyTorch repo (version 2, @candidate), predicted likewise,
   with ``temperature`` 0.0 too;
3. ``onnx`` from the same commit again, through the CLI: version 1 is reused, nothing logged;
4. ``onnx`` from another commit, passed in as a fetched snapshot: version 3;
5. ``onnx`` from the PyTorch repo, built to ONNX int4 on the way: version 4.

The tests below assert on what each step left behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from phi3ops.errors import InvalidInputError
from phi3ops.names import CANDIDATE_ALIAS, LineageTag
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant
from tasks.hub import MANIFEST_NAME, FetchResult
from tasks.packaging import requirements_digest
from tasks.registry import RegisteredVersion

pytestmark = pytest.mark.usefixtures("prefect_harness")

MODEL_NAME = "phi3-mini"  # the settings default
HF_TOKEN = "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"
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data")


@dataclass
class Store:
    """What packaging left in one MLflow store, and what was seen along the way."""

    data_dir: Path
    onnx_sha: str
    onnx_sha_v2: str
    pytorch_sha: str
    onnx: RegisteredVersion
    transformers: RegisteredVersion
    again_cli_output: str
    other_commit: RegisteredVersion
    other_fetched: FetchResult
    built: RegisteredVersion
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)


def _counts(data_dir: Path) -> tuple[int, int, int]:
    """(runs, logged models, artifact bytes) in the store."""
    import mlflow

    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(experiment_ids=experiments, output_format="list")
    models = mlflow.search_logged_models(experiment_ids=experiments, output_format="list")
    return len(runs), len(models), _tree_bytes(data_dir / "mlartifacts")


def _tree_bytes(root: Path, suffixes: tuple[str, ...] = ("",)) -> int:
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes)
    )


def _predict(uri: str, payload: dict[str, Any]) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(uri).predict(payload)


@pytest.fixture(scope="module")
def store(tiny_phi3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    import mlflow
    from huggingface_hub.utils import close_session
    from typer.testing import CliRunner

    from cli.app import app
    from flows.fetch import fetch_flow
    from flows.package import package_flow
    from offline.local_hub import LocalHub
    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    data_dir = tmp_path_factory.mktemp("package") / "data"
    with pytest.MonkeyPatch.context() as mp, LocalHub() as hub:
        onnx_sha = hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
        pytorch_sha = hub.add_repo(PYTORCH_REPO_ID, tiny_phi3.pytorch_dir, gated=True)
        hub.allow_token(HF_TOKEN)
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        mp.setenv("PHI3OPS_HF_ENDPOINT", hub.url)
        mp.setenv("HF_TOKEN", HF_TOKEN)  # the gated PyTorch repo needs it
        get_settings.cache_clear()

        predictions: dict[str, Any] = {}
        counts: dict[str, tuple[int, int, int]] = {}
        candidate = f"models:/{MODEL_NAME}@{CANDIDATE_ALIAS}"

        onnx = package_flow(flavor=Flavor.ONNX)
        predictions["onnx"] = _predict(candidate, CHAT)
        predictions["onnx_prompt"] = _predict(candidate, {"prompt": "Hi", "max_tokens": 3})

        transformers = package_flow(flavor=Flavor.TRANSFORMERS)
        model = mlflow.pyfunc.load_model(candidate)
        predictions["transformers_default"] = model.predict(CHAT)
        predictions["transformers_t0"] = model.predict({**CHAT, "temperature": 0.0})
        predictions["transformers_t0_again"] = model.predict({**CHAT, "temperature": 0.0})
        del model

        configure_tracking()
        counts["before_again"] = _counts(data_dir)
        result = CliRunner().invoke(app, ["package", "--flavor", "onnx"])
        assert result.exit_code == 0, result.output
        configure_tracking()
        counts["after_again"] = _counts(data_dir)

        onnx_sha_v2 = hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir, branch="v2")
        other_fetched = fetch_flow(repo_id=ONNX_REPO_ID, revision="v2")
        other_commit = package_flow(other_fetched, flavor=Flavor.ONNX)
        built = package_flow(flavor=Flavor.ONNX, variant=Variant.PYTORCH)
        configure_tracking()
        counts["end"] = _counts(data_dir)
    close_session()
    get_settings.cache_clear()

    return Store(
        data_dir=data_dir,
        onnx_sha=onnx_sha,
        onnx_sha_v2=onnx_sha_v2,
        pytorch_sha=pytorch_sha,
        onnx=onnx,
        transformers=transformers,
        again_cli_output=result.output,
        other_commit=other_commit,
        other_fetched=other_fetched,
        built=built,
        counts=counts,
        predictions=predictions,
    )


@pytest.fixture
def registry(store: Store, monkeypatch: pytest.MonkeyPatch):
    """An MlflowClient on the module's store."""
    from mlflow import MlflowClient

    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(store.data_dir))
    get_settings.cache_clear()
    configure_tracking()
    return MlflowClient()


def _logged_model_dir(version: Any) -> Path:
    """The artifact folder of the logged model behind a registered version (local store)."""
    import mlflow

    model_id = version.source.removeprefix("models:/")
    location = mlflow.get_logged_model(model_id).artifact_location
    assert location.startswith("file://")
    return Path(location.removeprefix("file://"))


def _snapshot_manifest(store: Store, repo_id: str, sha: str) -> dict[str, Any]:
    folder = store.data_dir / "snapshots" / repo_id.replace("/", "--") / sha
    return json.loads((folder / MANIFEST_NAME).read_text())


# --- versions and aliases ---------------------------------------------------------------------


@pytest.mark.slow
def test_each_new_package_is_a_new_version_and_the_latest_is_candidate(store, registry) -> None:
    assert (store.onnx.version, store.onnx.reused, store.onnx.flavor) == ("1", False, "onnx")
    assert (store.transformers.version, store.transformers.reused) == ("2", False)
    assert store.transformers.flavor is Flavor.TRANSFORMERS
    assert (store.other_commit.version, store.other_commit.reused) == ("3", False)
    assert (store.built.version, store.built.flavor) == ("4", Flavor.ONNX)
    assert store.onnx.aliases == store.transformers.aliases == [CANDIDATE_ALIAS]
    versions = registry.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert str(registry.get_model_version_by_alias(MODEL_NAME, CANDIDATE_ALIAS).version) == "4"
    assert store.other_commit.tags[LineageTag.COMMIT_SHA] == store.onnx_sha_v2 != store.onnx_sha


@pytest.mark.slow
def test_packaging_the_same_source_again_reuses_the_version_and_copies_nothing(store) -> None:
    assert store.again_cli_output.strip().endswith(f"reused models:/{MODEL_NAME}/1 (onnx)")
    # No new run, no new logged model, not one more artifact byte.
    assert store.counts["after_again"] == store.counts["before_again"]
    runs, models, _ = store.counts["end"]
    assert (runs, models) == (4, 4)


# --- lineage ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_versions_and_runs_carry_the_lineage(store, registry) -> None:
    import mlflow

    from phi3ops.serving.signatures import MODEL_ENTRY_FILE, model_package_digest

    onnx_manifest = _snapshot_manifest(store, ONNX_REPO_ID, store.onnx_sha)
    torch_manifest = _snapshot_manifest(store, PYTORCH_REPO_ID, store.pytorch_sha)
    expected = {
        "1": {
            LineageTag.SOURCE_REPO: ONNX_REPO_ID,
            LineageTag.SOURCE_REVISION: "main",
            LineageTag.COMMIT_SHA: store.onnx_sha,
            LineageTag.MANIFEST_DIGEST: onnx_manifest["manifest_digest"],
            LineageTag.VARIANT: "onnx-cpu-int4",
            LineageTag.FLAVOR: "onnx",
            LineageTag.QUANTIZATION: "int4-rtn-block-32-acc-level-4",
        },
        "2": {
            LineageTag.SOURCE_REPO: PYTORCH_REPO_ID,
            LineageTag.COMMIT_SHA: store.pytorch_sha,
            LineageTag.MANIFEST_DIGEST: torch_manifest["manifest_digest"],
            LineageTag.VARIANT: "pytorch",
            LineageTag.FLAVOR: "transformers",
            LineageTag.QUANTIZATION: "bfloat16",
            LineageTag.WRAPPER_VERSION: "mlflow==3.17.2;transformers==5.24.0",
        },
        "3": {
            LineageTag.SOURCE_REVISION: "v2",
            LineageTag.COMMIT_SHA: store.onnx_sha_v2,
            LineageTag.MANIFEST_DIGEST: store.other_fetched.manifest_digest,
        },
        "4": {
            LineageTag.SOURCE_REPO: PYTORCH_REPO_ID,
            LineageTag.COMMIT_SHA: store.pytorch_sha,
            LineageTag.MANIFEST_DIGEST: torch_manifest["manifest_digest"],
            LineageTag.VARIANT: "pytorch",
            LineageTag.FLAVOR: "onnx",
            LineageTag.QUANTIZATION: "int4-default-block-32-acc-level-4",
        },
    }
    # MLflow's UI lists each logged model by a name that says what it is.
    onnx = "phi-3-mini-4k-instruct-onnx-int4"
    names = {"1": onnx, "2": "phi-3-mini-4k-instruct-transformers", "3": onnx, "4": onnx}
    keys = set()
    for version, wanted in expected.items():
        mv = registry.get_model_version(MODEL_NAME, version)
        assert mlflow.get_logged_model(mv.source.removeprefix("models:/")).name == names[version]
        tags = mv.tags
        assert set(LineageTag) <= set(tags), version
        for key, value in wanted.items():
            assert tags[key] == value, (version, key)
        keys.add(tags[LineageTag.PACKAGE_KEY])
        # The digest is over exactly the requirements the logged model declares.
        requirements = (_logged_model_dir(mv) / "requirements.txt").read_text()
        pins = [line for line in requirements.splitlines() if line and not line.startswith("#")]
        assert tags[LineageTag.PIP_REQUIREMENTS_DIGEST] == requirements_digest(pins), version
        assert all("==" in pin for pin in pins)
        if tags[LineageTag.FLAVOR] == "onnx":
            # The wrapper version is the digest of the phi3_chat package logged with the model
            # (code_paths), whose entry file is the models-from-code file.
            logged = _logged_model_dir(mv)
            assert (logged / MODEL_ENTRY_FILE.name).is_file()
            digest = model_package_digest(logged / "code" / "phi3_chat")
            assert tags[LineageTag.WRAPPER_VERSION] == f"sha256:{digest}"
        # The packaging run is tagged with the same lineage.
        run_tags = registry.get_run(mv.run_id).data.tags
        assert {k: run_tags[k] for k in LineageTag} == {k: tags[k] for k in LineageTag}
    assert len(keys) == 4


@pytest.mark.slow
def test_the_hf_token_is_in_no_tag_param_or_artifact(store, registry) -> None:
    import mlflow

    seen: list[str] = []
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    for run in mlflow.search_runs(experiment_ids=experiments, output_format="list"):
        seen += [*run.data.tags.values(), *run.data.params.values()]
    for model in mlflow.search_logged_models(experiment_ids=experiments, output_format="list"):
        seen += [*model.tags.values(), *model.params.values()]
    for registered in registry.search_registered_models():
        seen += list(registered.tags.values())
    for version in registry.search_model_versions(f"name = '{MODEL_NAME}'"):
        seen += list(version.tags.values())
    assert seen and not [value for value in seen if HF_TOKEN in str(value)]
    files = [p for p in (store.data_dir / "mlartifacts").rglob("*") if p.is_file()]
    assert files and not [p for p in files if HF_TOKEN.encode() in p.read_bytes()]


# --- weights are copied once -------------------------------------------------------------------


@pytest.mark.slow
def test_each_logged_model_holds_exactly_one_copy_of_the_weights(store, registry) -> None:
    onnx_dir = store.other_fetched.model_dir
    onnx_weights = _tree_bytes(onnx_dir, (".onnx", ".onnx.data"))
    torch_dir = store.data_dir / "snapshots" / PYTORCH_REPO_ID.replace("/", "--")
    torch_weights = _tree_bytes(torch_dir / store.pytorch_sha, (".safetensors",))
    for version, weights in (("1", onnx_weights), ("2", torch_weights), ("3", onnx_weights)):
        location = _logged_model_dir(registry.get_model_version(MODEL_NAME, version))
        logged_weights = _tree_bytes(location, _WEIGHT_SUFFIXES)
        # One copy: the ONNX files byte for byte; safetensors re-serialised in one file, with
        # only its header differing from the two source shards.
        assert abs(logged_weights - weights) <= 1024, (version, logged_weights, weights)
        total = _tree_bytes(location)
        assert total < 2 * weights
    # And nothing else in the store holds weights: one copy per logged model.
    built_dir = store.data_dir / "cache" / "onnx-int4"
    built_weights = _tree_bytes(built_dir, (".onnx", ".onnx.data"))
    everything = _tree_bytes(store.data_dir / "mlartifacts", _WEIGHT_SUFFIXES)
    assert abs(everything - (2 * onnx_weights + torch_weights + built_weights)) <= 1024


def _disk_bytes(*roots: Path) -> tuple[int, int]:
    """(bytes summed per name, bytes on disk: each inode once, as ``du`` counts them)."""
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    inodes = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in files}
    return sum(p.stat().st_size for p in files), sum(inodes.values())


@pytest.mark.slow
def test_snapshot_artifacts_and_served_folder_share_one_copy_of_each_weight_file(
    store, registry, tmp_path
) -> None:
    from phi3ops.serving.follow import download_model
    from phi3ops.weights_links import same_bytes

    version = registry.get_model_version(MODEL_NAME, "1")
    logged = _logged_model_dir(version) / "artifacts"
    (logged_dir,) = [p for p in logged.iterdir() if p.is_dir()]
    snapshot_root = store.data_dir / "snapshots" / ONNX_REPO_ID.replace("/", "--") / store.onnx_sha
    (model_dir,) = {p.parent for p in snapshot_root.rglob("genai_config.json")}
    served = download_model(f"models:/{MODEL_NAME}/1", tmp_path / "serving" / "v1")

    weights = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert any(p.name.endswith((".onnx", ".onnx.data")) for p in weights)
    served_dir = served / logged_dir.relative_to(logged.parent)
    for relative in weights:
        copies = [model_dir / relative, logged_dir / relative, served_dir / relative]
        # One inode per file across snapshot, MLflow artifacts and the server's folder ...
        assert len({(p.stat().st_dev, p.stat().st_ino) for p in copies}) == 1, relative
        # ... read-only, so nothing edits all three at once by accident.
        assert not copies[0].stat().st_mode & 0o222, relative
    # The served folder is a complete model (MLmodel, code, artifacts), byte for byte.
    for path in (p for p in _logged_model_dir(version).rglob("*") if p.is_file()):
        assert same_bytes(path, served / path.relative_to(_logged_model_dir(version)))
    named, on_disk = _disk_bytes(model_dir, logged_dir, served_dir)
    weight_bytes = _tree_bytes(model_dir)
    assert named == 3 * weight_bytes and on_disk == weight_bytes, (named, on_disk)
    print(f"\nweights named {named:,} bytes, on disk {on_disk:,} bytes")
    # Removing the served folder (as stop_server does) leaves the logged model whole.
    shutil.rmtree(served)
    assert _tree_bytes(logged_dir) == weight_bytes


# --- the packaged models serve the chat shape -------------------------------------------------


def _assert_chat_completion(answer: Any, *, model: str | None = None) -> None:
    assert isinstance(answer, list) and len(answer) == 1
    completion = answer[0]
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= completion["usage"]["completion_tokens"] <= CHAT["max_tokens"]
    if model is not None:
        assert completion["model"] == model


@pytest.mark.slow
def test_onnx_flavor_loads_by_alias_and_answers_chat_and_prompts(store) -> None:
    _assert_chat_completion(store.predictions["onnx"], model=ONNX_REPO_ID)
    assert isinstance(store.predictions["onnx_prompt"][0], str)


@pytest.mark.slow
def test_transformers_flavor_answers_chat_greedily_with_temperature_zero(store) -> None:
    for key in ("transformers_default", "transformers_t0", "transformers_t0_again"):
        _assert_chat_completion(store.predictions[key])

    def text(key: str) -> str:
        return store.predictions[key][0]["choices"][0]["message"]["content"]

    # Greedy: temperature 0 is deterministic and the same as the default decoding.
    assert text("transformers_t0") == text("transformers_t0_again") == text("transformers_default")


# --- input errors (no model needed) -----------------------------------------------------------


def test_bad_model_name_fails_before_fetching(local_hub) -> None:
    from flows.package import package_flow

    with pytest.raises(InvalidInputError, match="not valid"):
        package_flow(flavor=Flavor.ONNX, model_name="team/phi3")
    assert local_hub.requests == []


def test_transformers_flavor_refuses_the_onnx_variant(local_hub) -> None:
    from flows.package import package_flow

    with pytest.raises(InvalidInputError, match="needs variant 'pytorch'"):
        package_flow(flavor=Flavor.TRANSFORMERS, variant=Variant.ONNX_CPU_INT4)
    assert local_hub.requests == []


def test_cli_reports_bad_inputs_without_starting_anything(local_hub) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    runner = CliRunner()
    bad_name = runner.invoke(app, ["package", "--model-name", "a:b"])
    assert bad_name.exit_code == 2
    assert "Registered model name 'a:b' is not valid" in bad_name.output
    mismatch = runner.invoke(
        app, ["package", "--flavor", "transformers", "--variant", "onnx-cpu-int4"]
    )
    assert mismatch.exit_code == 2
    assert "needs variant 'pytorch'" in mismatch.output
    assert local_hub.requests == []
