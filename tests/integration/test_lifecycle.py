"""The lifecycle flow end to end on the tiny Phi-3 from the local hub, and `phi3ops demo`.

One module-scoped store runs the lifecycle the way a user would, recording what the registry
and the tracking store hold after each run:

1. the default source (ONNX int4), demo gates: version 1 registered, evaluated, @champion;
2. the same again: everything reused, nothing new, the champion left alone;
3. a new commit of the source (branch ``v2``) with the gates in settings: version 2 registered
   and evaluated, compared with the champion, rejected (random weights: pass rate 0);
4. ``v2`` again with the demo gates: version and evaluation reused, promoted over version 1.

The tiny model answers gibberish, so the gates the demo relaxes are relaxed here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.jobs import DEMO_GATES
from flows.lifecycle import LifecycleResult, Source, lifecycle_flow
from phi3ops.errors import EvalSetNotFoundError, HubUnreachableError, InvalidInputError
from phi3ops.names import EvalTag, LineageTag, lifecycle_artifact_key
from phi3ops.policies import GateOverrides, GatePolicy
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID
from tasks.evaluation import evaluation_tag_key
from tests.artifacts import latest_artifact_data

pytestmark = pytest.mark.usefixtures("prefect_harness")

MODEL_NAME = "phi3-lifecycle"
SMOKE = "smoke"
PARAMETERS = {
    "source",
    "model_name",
    "eval_set",
    "gates",
    "evaluate_champion",
    "live_traffic",
    "canary_share",
}


@dataclass
class Snapshot:
    """What the store holds after one lifecycle run."""

    versions: list[str]
    eval_runs: list[str]
    promotion_runs: int
    champion: str | None
    previous: str | None


@dataclass
class Scenario:
    tracking_uri: str
    results: list[LifecycleResult] = field(default_factory=list)
    after: list[Snapshot] = field(default_factory=list)
    version_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    eval_run_tags: dict[str, dict[str, str]] = field(default_factory=dict)
    v2_sha: str = ""
    summaries: list[str] = field(default_factory=list)  # each run's lifecycle-summary artifact


def _snapshot(client) -> Snapshot:
    from mlflow.exceptions import MlflowException

    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids=experiments, max_results=1000)
    aliases = {}
    for alias in ("champion", "previous"):
        try:
            aliases[alias] = str(client.get_model_version_by_alias(MODEL_NAME, alias).version)
        except MlflowException:
            aliases[alias] = None
    return Snapshot(
        versions=sorted(
            str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")
        ),
        eval_runs=sorted(r.info.run_id for r in runs if EvalTag.EVAL_SET_HASH.value in r.data.tags),
        promotion_runs=sum(r.data.tags.get("phi3ops.run_type") == "promotion" for r in runs),
        champion=aliases["champion"],
        previous=aliases["previous"],
    )


@pytest.fixture(scope="module")
def scenario(
    prefect_harness, tiny_phi3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    from huggingface_hub.utils import close_session
    from mlflow import MlflowClient

    from offline.local_hub import LocalHub
    from phi3ops.settings import get_settings
    from phi3ops.tracking import tracking_uri

    data_dir = tmp_path_factory.mktemp("lifecycle") / "data"
    with pytest.MonkeyPatch.context() as mp, LocalHub() as hub:
        hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
        hub.add_repo(PYTORCH_REPO_ID, tiny_phi3.pytorch_dir)
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        mp.setenv("PHI3OPS_HF_ENDPOINT", hub.url)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.delenv(name, raising=False)
        get_settings.cache_clear()
        uri = tracking_uri()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        done = Scenario(tracking_uri=uri)
        demo = GateOverrides(**DEMO_GATES)

        def run(**parameters) -> None:
            done.results.append(lifecycle_flow(model_name=MODEL_NAME, eval_set=SMOKE, **parameters))
            done.after.append(_snapshot(client))
            done.summaries.append(latest_artifact_data(lifecycle_artifact_key(MODEL_NAME)))

        run(gates=demo)
        run(gates=dict(DEMO_GATES))  # a JSON dict, as a deployment sends it
        done.v2_sha = hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir, branch="v2")
        run(source=Source(revision="v2"))
        run(source={"revision": "v2"}, gates=demo)
        for version in done.after[-1].versions:
            done.version_tags[version] = dict(client.get_model_version(MODEL_NAME, version).tags)
        for run_id in done.after[-1].eval_runs:
            done.eval_run_tags[run_id] = dict(client.get_run(run_id).data.tags)
    close_session()
    get_settings.cache_clear()
    return done


@pytest.mark.slow
def test_first_run_registers_evaluates_and_promotes(scenario: Scenario) -> None:
    first, after = scenario.results[0], scenario.after[0]
    assert (first.version, first.package_reused, first.evaluation_reused) == ("1", False, False)
    assert (first.decision, first.champion, first.is_champion) == ("promoted", "1", True)
    assert first.model_uri == f"models:/{MODEL_NAME}/1" and first.eval_set == SMOKE
    assert first.source.startswith(f"{ONNX_REPO_ID}@") and "pass_rate" in first.metrics
    assert (after.versions, after.champion, after.previous) == (["1"], "1", None)
    assert after.eval_runs == [first.eval_run_id]

    tags = scenario.version_tags["1"]
    assert tags[LineageTag.SOURCE_REPO.value] == ONNX_REPO_ID
    assert tags[LineageTag.COMMIT_SHA.value] == first.source.split("@")[1]
    assert tags[LineageTag.FLAVOR.value] == "onnx"
    assert tags[LineageTag.PACKAGE_KEY.value]
    # the evaluation is linked both ways: version -> run, run -> version
    assert tags[evaluation_tag_key(first.eval_set_hash)] == first.eval_run_id
    run_tags = scenario.eval_run_tags[first.eval_run_id]
    assert run_tags[EvalTag.MODEL_VERSION.value] == "1"
    assert run_tags[EvalTag.EVAL_SET_HASH.value] == first.eval_set_hash
    assert tags["phi3ops.promotion.decision"] == "promoted"


@pytest.mark.slow
def test_rerun_reuses_version_and_evaluation_and_leaves_the_champion(scenario: Scenario) -> None:
    first, again = scenario.results[0], scenario.results[1]
    assert (again.version, again.package_reused, again.evaluation_reused) == ("1", True, True)
    assert again.eval_run_id == first.eval_run_id and again.metrics == first.metrics
    assert (again.decision, again.champion) == ("unchanged", "1")
    assert scenario.after[1] == scenario.after[0]  # no version, no run, no alias moved


@pytest.mark.slow
def test_new_commit_is_compared_with_the_champion_and_rejected_by_default_gates(
    scenario: Scenario,
) -> None:
    challenger, after = scenario.results[2], scenario.after[2]
    assert (challenger.version, challenger.package_reused) == ("2", False)
    assert challenger.source == f"{ONNX_REPO_ID}@{scenario.v2_sha}"
    assert not challenger.evaluation_reused
    assert (challenger.decision, challenger.champion) == ("rejected", "1")
    assert any(reason.startswith("pass_rate:") for reason in challenger.reasons)
    assert (after.versions, after.champion, after.previous) == (["1", "2"], "1", None)
    assert len(after.eval_runs) == 2
    assert scenario.version_tags["2"]["phi3ops.promotion.champion_before"] == "1"
    # The lifecycle run's own page tells it: source, version, evaluation, the failed gate.
    page = scenario.summaries[2]
    assert page.startswith(f"# {MODEL_NAME} v2: rejected: aliases untouched, @champion stays 1")
    assert f"`{ONNX_REPO_ID}@{scenario.v2_sha}` (revision `v2`)" in page
    assert f"`models:/{MODEL_NAME}/2`, flavor **onnx**: new" in page
    assert f"- evaluation run: `{challenger.eval_run_id}`" in page
    assert "| pass_rate | " in page and "| FAIL |" in page


@pytest.mark.slow
def test_relaxed_gates_promote_the_challenger_reusing_its_evaluation(scenario: Scenario) -> None:
    rejected, promoted = scenario.results[2], scenario.results[3]
    assert (promoted.version, promoted.package_reused, promoted.evaluation_reused) == (
        "2",
        True,
        True,
    )
    assert promoted.eval_run_id == rejected.eval_run_id
    assert (promoted.decision, promoted.champion) == ("promoted", "2")
    after = scenario.after[3]
    assert (after.champion, after.previous) == ("2", "1")
    assert after.eval_runs == scenario.after[2].eval_runs  # nothing evaluated again
    assert after.promotion_runs == 3  # promoted v1, rejected v2, promoted v2
    assert scenario.summaries[3].startswith(
        f"# {MODEL_NAME} v2: promoted: @champion is version 2 (was 1)"
    )
    assert "Not checked: version 1 is already @champion" in scenario.summaries[1]


# --- parameters: a clear form, and bad values fail before any work ---------------------------


def test_parameter_schema_documents_every_field() -> None:
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(lifecycle_flow).model_dump()
    properties, definitions = schema["properties"], schema["definitions"]
    assert set(properties) == PARAMETERS and schema["required"] == []
    for name in PARAMETERS:
        assert properties[name].get("description"), name
    assert properties["eval_set"]["default"] == "phi3-default"
    assert properties["evaluate_champion"]["default"] is True
    assert properties["source"]["default"]["flavor"] == "onnx"

    source = definitions["Source"]["properties"]
    assert set(source) == {"repo_id", "revision", "flavor", "variant"}
    assert all(field.get("description") for field in source.values())
    assert ONNX_REPO_ID in source["repo_id"]["description"]
    assert definitions["Flavor"]["enum"] == ["onnx", "transformers"]
    assert set(definitions["Variant"]["enum"]) == {"pytorch", "onnx-cpu-int4"}

    gates = definitions["GateOverrides"]["properties"]
    assert set(gates) == set(GatePolicy.model_fields)  # every gate, and nothing else
    assert all(field.get("description") for field in gates.values())


def test_deployment_parameters_arrive_as_json_and_become_models() -> None:
    parameters = lifecycle_flow.validate_parameters(
        {
            "source": {"repo_id": "org/phi3-finetune", "flavor": "onnx", "variant": "pytorch"},
            "gates": {"min_pass_rate": 0.5, "min_tag_pass_rate": {"safety": 0.9}},
        }
    )
    source, gates = parameters["source"], parameters["gates"]
    assert isinstance(source, Source) and isinstance(gates, GateOverrides)
    assert source.fetch_plan[1:] == ("pytorch", True)  # fetch PyTorch weights, build int4
    assert gates.model_dump(exclude_none=True) == {
        "min_pass_rate": 0.5,
        "min_tag_pass_rate": {"safety": 0.9},
    }
    assert lifecycle_flow.validate_parameters({})["source"].fetch_plan == (
        ONNX_REPO_ID,
        "onnx-cpu-int4",
        False,
    )


@pytest.mark.parametrize(
    ("parameters", "error", "match"),
    [
        ({"source": {"flavor": "gguf"}}, "ParameterTypeError", "source.flavor"),
        ({"source": {"variant": "fp16"}}, "ParameterTypeError", "source.variant"),
        (
            {"source": {"flavor": "transformers", "variant": "onnx-cpu-int4"}},
            "ParameterTypeError",
            "needs variant 'pytorch'",
        ),
        (
            {"source": {"flavor": "transformers", "repo_id": ONNX_REPO_ID}},
            "ParameterTypeError",
            "set repo_id to microsoft/Phi-3-mini-4k-instruct",
        ),
        ({"gates": {"min_pass_rat": 0}}, "ParameterTypeError", "gates.min_pass_rat"),
        ({"gates": {"max_error_rate": 2}}, "ParameterTypeError", "gates.max_error_rate"),
        ({"eval_set": "no-such-set"}, EvalSetNotFoundError, "No eval set 'no-such-set'"),
        ({"model_name": "team/phi3"}, InvalidInputError, "not valid"),
    ],
)
def test_bad_parameters_fail_before_any_work(
    parameters: dict, error, match: str, isolated_settings: Path
) -> None:
    from prefect.exceptions import ParameterTypeError

    # Nothing serves the hub here (HF_ENDPOINT is a discard port): a fetch would fail otherwise.
    expected = ParameterTypeError if error == "ParameterTypeError" else error
    with pytest.raises(expected, match=match):
        lifecycle_flow(**parameters)
    assert not (isolated_settings / "snapshots").exists()
    assert not (isolated_settings / "mlflow.db").exists()


def test_the_job_checks_inputs_before_prefect_starts(monkeypatch) -> None:
    import flows.lifecycle
    from cli.jobs import lifecycle_job

    monkeypatch.setattr(flows.lifecycle, "lifecycle_flow", lambda **_: pytest.fail("ran"))
    for kwargs, error, match in [
        ({"gates": {"min_pass_rat": 0.0}}, InvalidInputError, "gates: min_pass_rat: Extra"),
        ({"gates": {"min_pass_rate": 3.0}}, InvalidInputError, "min_pass_rate: Input should"),
        ({"repo_id": PYTORCH_REPO_ID}, InvalidInputError, "or variant 'pytorch'"),
        ({"flavor": "gguf"}, InvalidInputError, "source: flavor: Input should be 'onnx'"),
        ({"model_name": "a b"}, InvalidInputError, "not valid"),
        ({"eval_set": "nope"}, InvalidInputError, "No eval set"),
        ({}, HubUnreachableError, "unreachable"),  # nothing serves the hub: the pre-check fails
    ]:
        with pytest.raises(error) as exc:
            lifecycle_job(**kwargs)
        assert match in str(exc.value), (kwargs, exc.value)


# --- `phi3ops demo` ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_prints_the_champion_and_a_second_demo_reuses_everything(
    tiny_phi3, isolated_settings: Path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    # The demo builds the tiny Phi-3 under its data dir: hand it the session's build.
    cache = isolated_settings / "demo" / "cache"
    cache.mkdir(parents=True)
    (cache / "tiny-phi3").symlink_to(tiny_phi3.root.parent, target_is_directory=True)
    monkeypatch.setenv("PHI3OPS_HF_ENDPOINT", "")  # restored after the test: the demo sets it
    monkeypatch.delenv("PHI3OPS_HF_ENDPOINT")

    outputs = []
    for _ in range(2):
        result = CliRunner().invoke(app, ["demo"])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    first, second = outputs
    assert "RANDOM weights" in first and "min_pass_rate=0" in first
    assert "registered; evaluation on phi3-default new" in first
    assert "promotion: promoted" in first
    assert "reused; evaluation on phi3-default reused" in second
    assert "promotion: unchanged" in second
    for output in outputs:
        assert "Champion: models:/phi3-mini@champion = version 1" in output
        assert "pass_rate" in output and "tokens_per_s" in output
        assert f"mlflow ui --backend-store-uri sqlite:///{isolated_settings}/demo/mlflow.db" in (
            output
        )
        assert "prefect server start" in output
    assert "PHI3OPS_HF_ENDPOINT" not in os.environ  # the demo cleaned up after itself
