"""Registering, reusing and aliasing versions in a real (SQLite) MLflow registry, no weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3ops.errors import PackagingError, RegistryError
from phi3ops.names import CANDIDATE_ALIAS, LineageTag
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, Flavor, Variant
from tasks.hub import FetchResult
from tasks.packaging import LoggedModelInfo, lineage_tags, log_onnx_model, plan_package
from tasks.registry import find_registered_version, register_version


def _snapshot(root: Path, sha: str) -> FetchResult:
    model_dir = root / sha / ONNX_CPU_INT4_SUBFOLDER
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"onnx")
    (model_dir / "genai_config.json").write_text(
        json.dumps({"model": {"decoder": {"filename": "model.onnx"}}})
    )
    return FetchResult(
        local_dir=root / sha,
        model_dir=model_dir,
        repo_id=ONNX_REPO_ID,
        revision="main",
        commit_sha=sha,
        variant=Variant.ONNX_CPU_INT4,
        manifest_digest=f"manifest-{sha[:6]}",
        total_bytes=4,
        downloaded_bytes=4,
        file_count=2,
    )


def _logged(fetched: FetchResult) -> LoggedModelInfo:
    """A weightless logged model standing in for what packaging logs."""
    import mlflow

    from phi3ops.tracking import configure_tracking

    plan = plan_package(fetched, Flavor.ONNX)
    configure_tracking()
    with mlflow.start_run(tags=lineage_tags(fetched, plan)) as run:
        model = mlflow.initialize_logged_model(name="model", source_run_id=run.info.run_id)
    return LoggedModelInfo(
        model_uri=f"models:/{model.model_id}",
        model_id=model.model_id,
        run_id=run.info.run_id,
        flavor=Flavor.ONNX,
        artifact_bytes=0,
        plan=plan,
    )


def test_register_tag_alias_reuse_and_new_versions(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    first = _snapshot(tmp_path, "a" * 40)
    plan = plan_package(first, Flavor.ONNX)
    assert find_registered_version(plan) is None  # no registered model yet: not an error

    v1 = register_version(_logged(first), first)
    assert (v1.model_name, v1.version, v1.reused) == ("phi3-mini", "1", False)
    assert v1.aliases == [CANDIDATE_ALIAS]
    assert v1.model_uri == "models:/phi3-mini/1"
    assert v1.candidate_uri == "models:/phi3-mini@candidate"
    assert v1.tags == lineage_tags(first, plan)
    assert v1.tags[LineageTag.PACKAGE_KEY] == plan.package_key

    found = find_registered_version(plan)
    assert found is not None
    assert (found.version, found.reused, found.aliases) == ("1", True, [CANDIDATE_ALIAS])

    # Registering the same package again (e.g. two racing packagings) adds no version.
    again = register_version(_logged(first), first)
    assert (again.version, again.reused) == ("1", True)

    # Another commit is another package: version 2 takes the candidate alias.
    second = _snapshot(tmp_path, "b" * 40)
    v2 = register_version(_logged(second), second)
    assert (v2.version, v2.reused, v2.aliases) == ("2", False, [CANDIDATE_ALIAS])
    client = MlflowClient()
    assert client.get_model_version("phi3-mini", "1").aliases == []
    assert str(client.get_model_version_by_alias("phi3-mini", CANDIDATE_ALIAS).version) == "2"
    assert len(client.search_model_versions("name = 'phi3-mini'")) == 2

    # Same package, other registered model: its own version 1.
    other = register_version(_logged(first), first, model_name="phi3-other")
    assert (other.model_name, other.version, other.reused) == ("phi3-other", "1", False)


def test_lookup_falls_back_to_client_side_filtering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    fetched = _snapshot(tmp_path, "c" * 40)
    registered = register_version(_logged(fetched), fetched)
    original = MlflowClient.search_model_versions
    filters: list[str] = []

    def no_tag_filters(self, filter_string=None, **kwargs):
        filters.append(filter_string)
        if "tags." in filter_string:
            raise MlflowException("Invalid attribute key 'tags' specified.")
        return original(self, filter_string, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_model_versions", no_tag_filters)
    found = find_registered_version(plan_package(fetched, Flavor.ONNX))
    assert found is not None and found.version == registered.version
    key = registered.tags[LineageTag.PACKAGE_KEY]
    assert filters == [
        f"name = 'phi3-mini' AND tags.`phi3ops.package_key` = '{key}'",
        "name = 'phi3-mini'",
    ]


def test_a_registration_left_pending_by_a_crash_is_finished_by_the_next_lookup(
    tmp_path: Path,
) -> None:
    """The process died between creating version 2 and moving @candidate onto it."""
    from mlflow import MlflowClient

    first = _snapshot(tmp_path, "d" * 40)
    register_version(_logged(first), first)
    second = _snapshot(tmp_path, "e" * 40)
    logged = _logged(second)
    client = MlflowClient()
    tags = lineage_tags(second, logged.plan) | {"phi3ops.registration": "pending"}
    client.create_model_version("phi3-mini", logged.model_uri, tags=tags)
    assert str(client.get_model_version_by_alias("phi3-mini", CANDIDATE_ALIAS).version) == "1"

    found = find_registered_version(logged.plan)  # what a re-run of the packaging does first
    assert found is not None
    assert (found.version, found.reused, found.aliases) == ("2", True, [CANDIDATE_ALIAS])
    assert found.tags == lineage_tags(second, logged.plan)  # no pending tag left
    assert str(client.get_model_version_by_alias("phi3-mini", CANDIDATE_ALIAS).version) == "2"


def test_a_failed_registration_leaves_no_version_and_no_logged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    fetched = _snapshot(tmp_path, "f" * 40)
    register_version(_logged(fetched), fetched)
    other = _snapshot(tmp_path, "0" * 40)
    logged = _logged(other)

    def refuse(self, name, alias, version):
        raise MlflowException("registry is read-only")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    with pytest.raises(RegistryError, match="read-only"):
        register_version(logged, other)
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'phi3-mini'")] == ["1"]
    with pytest.raises(MlflowException):
        client.get_logged_model(logged.model_id)  # deleted, not left behind


def test_a_failed_logging_fails_its_run_and_discards_the_logged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc  # the module itself: `mlflow.pyfunc` may still be MLflow's lazy loader
    from mlflow import MlflowClient

    fetched = _snapshot(tmp_path, "1" * 40)
    weights = tmp_path / "copied"
    weights.mkdir()
    (weights / "model.onnx").write_bytes(b"w" * 1000)
    locations: list[str] = []

    def fails_half_way(**kwargs):
        run_id = mlflow.active_run().info.run_id
        model = mlflow.initialize_logged_model(
            name="model", source_run_id=run_id, tags=kwargs["tags"]
        )
        MlflowClient().log_model_artifacts(model.model_id, str(weights))
        locations.append(model.artifact_location)
        raise OSError("No space left on device")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", fails_half_way)
    with pytest.raises(PackagingError, match="No space left"):
        log_onnx_model(fetched)
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    assert run.info.status == "FAILED"
    assert client.search_logged_models(experiments) == []
    assert not Path(locations[0].removeprefix("file://")).exists()
