"""`phi3ops status` and each version's registry description, read back from a real (SQLite)
MLflow store holding weightless versions; and the eval set as an MLflow dataset input.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from phi3ops.names import (
    CANARY_TAG_PREFIX,
    CANDIDATE_ALIAS,
    CHAMPION_ALIAS,
    MONITOR_TAG_PREFIX,
    EvalTag,
    LineageTag,
)
from tasks.status import model_status, refresh_description, version_status

NAME = "phi3-status"
REPO = "microsoft/Phi-3-mini-4k-instruct-onnx"


def _evaluation(client, version: str, *, eval_set: str, content_hash: str, metrics: dict) -> str:
    """An evaluation run of ``version`` as the evaluate stage records it: tags, metrics, and the
    version's ``phi3ops.eval.<hash>`` tag pointing at the run.
    """
    import mlflow

    from tasks.evaluation import evaluation_tag_key

    tags = {
        EvalTag.MODEL_NAME.value: NAME,
        EvalTag.MODEL_VERSION.value: version,
        EvalTag.MODEL_URI.value: f"models:/{NAME}/{version}",
        EvalTag.EVAL_SET.value: eval_set,
        EvalTag.EVAL_SET_HASH.value: content_hash,
    }
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_metrics(metrics)
    client.set_model_version_tag(NAME, version, evaluation_tag_key(content_hash), run.info.run_id)
    return run.info.run_id


@pytest.fixture
def store(isolated_settings: Path):
    """Three versions: v1 aborted in a canary, v2 the evaluated, promoted and monitored
    champion, v3 the candidate taking a 10% canary share now.
    """
    from mlflow import MlflowClient

    from phi3ops.tracking import configure_tracking
    from phi3ops.traffic import TrafficPlan, write_plan

    configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    for sha in ("a" * 40, "b" * 40, "c" * 40):
        client.create_model_version(
            NAME,
            source=str(isolated_settings / "weights"),
            tags={
                LineageTag.SOURCE_REPO.value: REPO,
                LineageTag.COMMIT_SHA.value: sha,
                LineageTag.FLAVOR.value: "onnx",
                LineageTag.QUANTIZATION.value: "int4-rtn-block-32",
            },
        )
    client.set_model_version_tag(NAME, "1", f"{CANARY_TAG_PREFIX}verdict", "aborted")
    client.set_model_version_tag(NAME, "1", f"{CANARY_TAG_PREFIX}mode", "canary")
    _evaluation(client, "2", eval_set="smoke", content_hash="1" * 64, metrics={"pass_rate": 0.5})
    newest = _evaluation(
        client,
        "2",
        eval_set="phi3-default",
        content_hash="2" * 64,
        metrics={
            "pass_rate": 0.8,
            "latency_p95_s": 1.25,
            "ttft_p95_s": 0.5,
            "s_per_token_p95": 0.03,
            "tokens_per_s": 42.0,
        },
    )
    client.set_model_version_tag(NAME, "2", "phi3ops.promotion.decision", "promoted")
    client.set_model_version_tag(NAME, "2", f"{MONITOR_TAG_PREFIX}last_outcome", "passed")
    client.set_model_version_tag(NAME, "2", f"{MONITOR_TAG_PREFIX}last_run_id", "mon-run")
    client.set_registered_model_alias(NAME, CHAMPION_ALIAS, "2")
    client.set_registered_model_alias(NAME, CANDIDATE_ALIAS, "3")
    write_plan(NAME, TrafficPlan.start("canary", share=0.1, candidate_version="3"))
    return client, newest


def test_model_status_reads_every_column_back(store) -> None:
    _, newest = store
    status = model_status(NAME)
    assert status.traffic is not None and status.traffic.share == 0.1
    v3, v2, v1 = status.versions  # newest first
    assert (v3.version, v3.aliases, v3.canary) == ("3", [CANDIDATE_ALIAS], "canary 10% (live)")
    assert v3.evaluation is None and v3.promotion is None and v3.monitor is None
    assert v2.aliases == [CHAMPION_ALIAS]
    assert v2.source == f"{REPO}@{'b' * 40}" and v2.flavor == "onnx"
    assert v2.evaluation is not None
    assert (v2.evaluation.run_id, v2.evaluation.eval_set) == (newest, "phi3-default")
    assert (v2.evaluation.pass_rate, v2.evaluation.latency_p95_s) == (0.8, 1.25)
    assert v2.evaluation.tokens_per_s == 42.0
    assert (v2.evaluation.ttft_p95_s, v2.evaluation.s_per_token_p95) == (0.5, 0.03)
    assert (v2.promotion, v2.monitor, v2.monitor_run_id) == ("promoted", "passed", "mon-run")
    assert v2.canary is None
    assert v1.canary == "canary aborted" and v1.aliases == []


def test_status_command_prints_one_table(store) -> None:
    # A wide terminal, so that no cell wraps (rich folds cells to fit the terminal).
    result = CliRunner().invoke(app, ["status", "--model-name", NAME], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("@champion", "@candidate", f"{REPO}@bbbbbbbbbbbb", "phi3-default", "0.8"):
        assert text in out, out
    for text in ("1.25", "42", "promoted", "passed", "canary 10% (live)", "canary aborted"):
        assert text in out, out
    assert "Live traffic: canary 10% to @candidate (version 3)" in out


def test_status_fits_an_80_column_terminal(store) -> None:
    """At COLUMNS=80 the eleven-column table would fold every cell into slivers: one block per
    version instead, every line within 80 characters, every fact still there.
    """
    result = CliRunner().invoke(app, ["status", "--model-name", NAME], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    out = result.output
    assert f"{NAME}: 3 version(s), newest first" in out
    # newest first, each version a heading with its aliases
    assert out.index("v3  @candidate") < out.index("v2  @champion") < out.index("v1\n")
    for text in (f"{REPO}@bbbbbbbbbbbb (onnx)", "phi3-default", "pass 0.8", "p95 1.25 s"):
        assert text in out, out
    for text in ("42 tok/s", "promoted", "passed", "canary 10% (live)", "canary aborted"):
        assert text in out, out
    assert "none yet" in out and "not decided yet" in out  # v3: no evaluation, no decision
    assert "Live traffic: canary 10% to @candidate (version 3)" in out


def test_the_narrow_layout_folds_what_is_too_long_instead_of_cutting_it() -> None:
    from rich.console import Console

    from cli.status import status_view
    from tasks.status import LastEvaluation, ModelStatus, VersionStatus

    repo = "an-organisation-with-a-long-name/phi-3-mini-4k-instruct-fine-tuned-on-support-tickets"
    found = ModelStatus(
        model_name="phi3-mini",
        versions=[
            VersionStatus(
                version=str(n),
                aliases=["champion", "previous", "candidate"][: n % 4],
                source=f"{repo}@{'e' * 40}",
                flavor="transformers",
                evaluation=LastEvaluation(
                    run_id="f" * 32,
                    eval_set="customer-support-regression-suite-2026",
                    eval_set_hash="3" * 64,
                    started_ms=n,
                    pass_rate=0.8125,
                    latency_p95_s=12.345,
                    tokens_per_s=3.71,
                ),
                promotion="rejected",
                monitor="insufficient-data",
                canary="shadow (live)",
            )
            for n in range(12, 0, -1)
        ],
    )
    for width, layout in ((80, "blocks"), (60, "blocks"), (400, "table")):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(status_view(found, console))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        assert ("newest first" in text) is (layout == "blocks"), width
        assert "…" not in text  # nothing cut with an ellipsis
        if layout == "table":
            assert f"{repo}@eeeeeeeeeeee" in text
        else:  # the long source is folded over lines
            joined = "".join(line.strip() for line in text.splitlines())
            assert f"{repo}@eeeeeeeeeeee (transformers)" in joined


def test_status_shows_the_inference_records_waiting_for_the_store(
    store, isolated_settings: Path
) -> None:
    status = model_status(NAME)
    assert (status.records_waiting, status.oldest_record_age_s) == (0, None)
    result = CliRunner().invoke(app, ["status", "--model-name", NAME], env={"COLUMNS": "250"})
    assert "Inference records: none waiting for the store." in result.output

    # A server that died on this data dir left 3 records the next server will store.
    spool = isolated_settings / "serving" / "spool"
    spool.mkdir(parents=True)
    (spool / "dead-server.jsonl").write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n')
    status = model_status(NAME)
    assert status.records_waiting == 3
    assert status.oldest_record_age_s is not None and 0 <= status.oldest_record_age_s < 60
    result = CliRunner().invoke(app, ["status", "--model-name", NAME], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "Inference records: 3 waiting in the servers' spool for the store" in result.output


def test_status_of_an_unknown_model_is_one_line_and_exit_2(store) -> None:
    result = CliRunner().invoke(app, ["status", "--model-name", "nobody"])
    assert result.exit_code == 2
    assert "no registered model 'nobody' (registered: phi3-status)" in result.output
    assert "Traceback" not in result.output


def test_the_description_shows_lineage_evaluation_and_decision(store) -> None:
    client, newest = store
    refresh_description(NAME, "2")
    description = client.get_model_version(NAME, "2").description
    assert f"source: `{REPO}@{'b' * 40}`" in description
    assert "flavor: onnx; quantization: int4-rtn-block-32" in description
    assert f"phi3-default (222222222222), run `{newest}`: pass rate 0.8" in description
    assert "p95 time to first token 0.5 s, p95 0.03 s/token, 42 tokens/s" in description
    assert "promotion: promoted" in description
    assert version_status(NAME, "3").evaluation is None
    refresh_description(NAME, "3")
    description = client.get_model_version(NAME, "3").description
    assert "last evaluation: none yet" in description
    assert "promotion: not decided yet" in description


@dataclass
class _Eval:
    version: str
    metrics: dict[str, float] = field(
        default_factory=lambda: {
            "pass_rate": 0.9,
            "latency_p95_s": 2.0,
            "tokens_per_s": 40.0,
            "error_rate": 0.0,
        }
    )
    eval_set_hash: str = "2" * 64
    run_id: str = "eval-run"


def test_registration_and_promotion_keep_the_description_current(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from phi3ops.settings import get_settings
    from tasks.promotion import apply_decision, evaluate_gates
    from tasks.registry import register_version
    from tests.unit.test_registry_store import _logged, _snapshot

    fetched = _snapshot(tmp_path, "d" * 40)
    registered = register_version(_logged(fetched), fetched)
    client = MlflowClient()
    description = client.get_model_version(registered.model_name, registered.version).description
    assert f"source: `{fetched.repo_id}@{'d' * 40}`" in description
    assert "promotion: not decided yet" in description

    decision = evaluate_gates(
        registered.model_name,
        registered.version,
        _Eval(registered.version),
        None,
        champion_version=None,
        policy=get_settings().gates,
    )
    apply_decision(decision, triggered_by="tests")
    description = client.get_model_version(registered.model_name, registered.version).description
    assert "promotion: promoted" in description


def test_the_eval_set_is_a_dataset_input_of_the_run(isolated_settings) -> None:
    import mlflow

    from phi3ops.evalset import open_eval_set
    from phi3ops.tracking import configure_tracking
    from tasks.evaluation.score import DATASET_DIGEST_LENGTH, log_eval_set_input

    eval_set = open_eval_set("smoke")
    configure_tracking()
    with mlflow.start_run() as run:
        log_eval_set_input(eval_set)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "smoke"
    assert dataset.digest == eval_set.content_hash[:DATASET_DIGEST_LENGTH]
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "evaluation")]
    assert f'"num_rows": {len(eval_set.items)}' in dataset.profile


@pytest.mark.parametrize(
    ("tracking", "linked"), [(None, False), ("http://mlflow.example:5000/", True)]
)
def test_prefect_artifacts_link_to_mlflow_only_on_a_tracking_server(
    tracking, linked, monkeypatch
) -> None:
    from phi3ops.settings import get_settings
    from phi3ops.tracking import run_url, version_url
    from tasks.evaluation import EvalSummary
    from tasks.evaluation.compare import mlflow_links
    from tasks.promotion import AliasState, decision_markdown, evaluate_gates

    if tracking:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    get_settings.cache_clear()
    summary = EvalSummary(
        run_id="r123",
        model_name=NAME,
        version="2",
        model_uri=f"models:/{NAME}/2",
        flavor="onnx",
        eval_set="smoke",
        eval_set_hash="1" * 64,
        metrics={},
        tag_pass_rates={},
    )
    decision = evaluate_gates(
        NAME, "2", _Eval("2"), None, champion_version=None, policy=get_settings().gates
    )
    state = AliasState(
        model_name=NAME, champion="2", previous=None, changed=True, action="promoted"
    )
    markdown = decision_markdown(decision, state, triggered_by="tests")
    if not linked:
        assert run_url("r123") is None and version_url(NAME, 2) is None
        assert mlflow_links(summary) == "" and "MLflow:" not in markdown
        return
    version_page = f"http://mlflow.example:5000/#/models/{NAME}/versions/2"
    assert run_url("r123") == "http://mlflow.example:5000/#/runs/r123"
    assert version_url(NAME, 2) == version_page
    assert "(http://mlflow.example:5000/#/runs/r123)" in mlflow_links(summary)
    assert f"({version_page})" in mlflow_links(summary)
    assert f"- MLflow: [{NAME} v2]({version_page})" in markdown
