"""The lifecycle run's own page: a Prefect markdown artifact and headline log lines that tell
source, version, evaluation, each gate, the decision and where to look in MLflow, rendered
from what the subflows returned (no model: the subflows are stood in for).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from phi3ops.names import lifecycle_artifact_key
from phi3ops.policies import GatePolicy
from phi3ops.sources import Flavor, Variant
from tasks.evaluation import EvalSummary
from tasks.gates import Decision, evaluate_gates
from tasks.hub import FetchResult
from tasks.lifecycle_summary import LifecycleReport, lifecycle_headline, lifecycle_markdown
from tasks.registry import RegisteredVersion

NAME = "phi3-story"
REPO = "microsoft/Phi-3-mini-4k-instruct-onnx"
SHA = "c0ffee" * 6 + "abcd"


def _fetched(tmp_path: Path) -> FetchResult:
    return FetchResult(
        local_dir=tmp_path,
        model_dir=tmp_path,
        repo_id=REPO,
        revision="main",
        commit_sha=SHA,
        variant=Variant.ONNX_CPU_INT4,
        manifest_digest="d" * 64,
        total_bytes=123_456,
        downloaded_bytes=0,
        file_count=7,
    )


def _registered(version: str = "2", *, reused: bool = False) -> RegisteredVersion:
    return RegisteredVersion(
        model_name=NAME,
        version=version,
        model_uri=f"models:/{NAME}/{version}",
        source=f"{REPO}@{SHA}",
        run_id="package-run",
        flavor=Flavor.ONNX,
        aliases=["candidate"],
        reused=reused,
        tags={},
    )


def _evaluation(version: str, **metrics: float) -> EvalSummary:
    values = {
        "n_items": 6.0,
        "pass_rate": 0.75,
        "latency_p95_s": 1.5,
        "ttft_p95_s": 0.5,
        "s_per_token_p95": 0.2,
        "tokens_per_s": 42.0,
        "error_rate": 0.0,
    } | metrics
    return EvalSummary(
        run_id=f"eval-run-{version}",
        model_name=NAME,
        version=version,
        model_uri=f"models:/{NAME}/{version}",
        flavor="onnx",
        eval_set="smoke",
        eval_set_hash="5" * 64,
        metrics=values,
        tag_pass_rates={},
    )


def _decision(candidate: EvalSummary, champion: EvalSummary | None) -> Decision:
    return evaluate_gates(
        NAME,
        candidate.version,
        candidate,
        champion,
        champion_version=champion.version if champion else None,
        policy=GatePolicy(),
    )


def _report(tmp_path: Path, *, outcome: str, **overrides) -> LifecycleReport:
    values = {
        "fetched": _fetched(tmp_path),
        "registered": _registered(),
        "evaluation": _evaluation("2"),
        "outcome": outcome,
        "decision": None,
        "champion": "2",
    }
    return LifecycleReport.model_validate(values | overrides)


def test_a_rejection_shows_source_version_evaluation_each_gate_and_the_decision(
    tmp_path: Path,
) -> None:
    candidate = _evaluation(
        "2",
        latency_p95_s=30.0,
        s_per_token_p95=0.3,
        generation_wall_s=41.2,
        generation_deadline_s=600.0,
        n_refused=1.0,
        n_timed_out=0.0,
    )
    decision = _decision(candidate, _evaluation("1"))
    report = _report(
        tmp_path, outcome="rejected", evaluation=candidate, decision=decision, champion="1"
    )
    markdown = lifecycle_markdown(report)
    assert markdown.startswith(f"# {NAME} v2: rejected: aliases untouched, @champion stays 1\n")
    assert f"- `{REPO}@{SHA}` (revision `main`)" in markdown
    assert "- variant onnx-cpu-int4; 7 files, 123,456 bytes" in markdown
    assert f"- `models:/{NAME}/2`, flavor **onnx**: new, with alias @candidate" in markdown
    assert "Eval set `smoke` (hash `555555555555`, 6 items)" in markdown
    # pass rate, p95 time to first token, p95 s/token, tokens/s, error rate
    assert "| 0.75 | 0.5 | 0.3 | 42 | 0 |" in markdown
    assert "Generation took 41 s of its 600 s deadline; items refused: 1, timed out: 0." in markdown
    assert f"Prefect artifact `eval-{NAME}-2`" in markdown
    assert "## Gates: 7 of 8 pass" in markdown
    assert "| gate | value | champion | threshold | result |" in markdown
    assert "| pass_rate | 0.75 | — | ≥ 0.6 | pass |" in markdown
    assert "| s_per_token_p95 vs champion | 0.3 | 0.2 | ≤ 0.25 | FAIL |" in markdown
    assert "**rejected**: aliases untouched, @champion stays 1." in markdown
    assert "- failed: s_per_token_p95 vs champion: 0.3 > 0.25" in markdown
    assert f"`promotion-{NAME}`" in markdown
    # A local store: ids, and how to open its UI.
    assert "- evaluation run: `eval-run-2` (experiment `phi3ops`)" in markdown
    assert f"- registered version: `models:/{NAME}/2` (packaging run `package-run`)" in markdown
    assert "mlflow ui --backend-store-uri sqlite:///" in markdown
    for line in markdown.splitlines():
        if line.startswith("|"):
            assert all(cell.strip() for cell in line.strip("|").split("|")), line

    headline = lifecycle_headline(report)
    assert headline[0] == (
        f"Source {REPO}@{SHA[:12]} (onnx-cpu-int4) -> models:/{NAME}/2 (onnx, new)"
    )
    assert headline[1] == (
        "Evaluation on smoke (new, run eval-run-2): pass rate 0.75, p95 time to first token "
        "0.5 s, p95 0.3 s/token, 42 tokens/s"
    )
    assert headline[2] == "Gates: 7 of 8 pass; failed: s_per_token_p95 vs champion: 0.3 > 0.25"
    assert headline[3] == "Decision: rejected: aliases untouched, @champion stays 1"


def test_a_promotion_and_an_unchanged_rerun_say_so(tmp_path: Path) -> None:
    first = _report(
        tmp_path,
        outcome="promoted",
        registered=_registered("1"),
        evaluation=_evaluation("1"),
        decision=_decision(_evaluation("1"), None),
        champion="1",
        built_onnx=True,
    )
    markdown = lifecycle_markdown(first)
    assert markdown.startswith(f"# {NAME} v1: promoted: @champion is version 1 (the first")
    assert "variant onnx-cpu-int4, built to ONNX int4 here" in markdown
    assert "## Gates: 3 of 3 pass" in markdown
    assert "Generation took" not in markdown  # an evaluation logged before those metrics
    assert lifecycle_headline(first)[2] == "Gates: 3 of 3 pass"

    again = _report(
        tmp_path,
        outcome="unchanged",
        registered=_registered("1", reused=True),
        evaluation=_evaluation("1").model_copy(update={"reused": True}),
        champion="1",
    )
    markdown = lifecycle_markdown(again)
    assert "reused (this package was registered before; nothing was logged)" in markdown
    assert "reused: this version was evaluated on it before" in markdown
    assert "Not checked: version 1 is already @champion: nothing to promote." in markdown
    assert "promotion-" not in markdown  # no decision was taken, so none is linked
    assert lifecycle_headline(again)[2:] == [
        "Gates: not checked (version 1 is already @champion: nothing to promote)",
        "Decision: unchanged: version 1 is already @champion",
    ]


def test_on_a_tracking_server_the_summary_links_to_the_mlflow_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phi3ops.settings import get_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example")
    get_settings.cache_clear()
    markdown = lifecycle_markdown(_report(tmp_path, outcome="unchanged"))
    assert "- evaluation run: [eval-run-2](https://mlflow.example/#/runs/eval-run-2)" in markdown
    assert (
        f"- registered version: [{NAME} v2](https://mlflow.example/#/models/{NAME}/versions/2)"
        in markdown
    )
    assert "(https://mlflow.example/#/runs/package-run)" in markdown
    assert "mlflow ui" not in markdown


@pytest.mark.usefixtures("prefect_harness")
def test_the_lifecycle_run_publishes_its_summary_and_logs_the_headline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow itself, its subflows stood in for: the values they return become the page."""
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    import flows.lifecycle as lifecycle
    from tests.artifacts import latest_artifact, run_logs

    champion: dict[str, str | None] = {"now": None}
    candidate = _evaluation("1")

    def promote(**kwargs) -> Decision:
        champion["now"] = "1"
        return _decision(candidate, None)

    monkeypatch.setattr(lifecycle, "fetch_flow", lambda **kwargs: _fetched(tmp_path))
    monkeypatch.setattr(lifecycle, "package_flow", lambda *a, **kw: _registered("1"))
    monkeypatch.setattr(lifecycle, "evaluate_flow", lambda **kwargs: candidate)
    monkeypatch.setattr(lifecycle, "promote_flow", promote)
    monkeypatch.setattr(lifecycle, "alias_version", lambda name, alias: champion["now"])

    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: True}):
        state = lifecycle.lifecycle_flow(model_name=NAME, eval_set="smoke", return_state=True)
        result = state.result()
        assert (result.decision, result.champion) == ("promoted", "1")
        flow_run_id = state.state_details.flow_run_id
        assert flow_run_id is not None
        deadline = time.monotonic() + 30
        while True:
            lines = run_logs(flow_run_id)
            if any("Decision:" in line for line in lines) or time.monotonic() > deadline:
                break
            time.sleep(0.5)

    artifact = latest_artifact(lifecycle_artifact_key(NAME))
    assert artifact.flow_run_id == flow_run_id
    assert artifact.type == "markdown"
    page = str(artifact.data)
    assert page.startswith(f"# {NAME} v1: promoted: @champion is version 1")
    assert "## Gates: 3 of 3 pass" in page and "eval-run-1" in page
    expected = [
        f"flows.lifecycle INFO {line}"
        for line in lifecycle_headline(
            LifecycleReport(
                fetched=_fetched(tmp_path),
                registered=_registered("1"),
                evaluation=candidate,
                outcome="promoted",
                decision=_decision(candidate, None),
                champion="1",
            )
        )
    ]
    assert [line for line in lines if line in expected] == expected, lines
