"""The nightly re-evaluation of the champion: a fresh run, compared with its earlier one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from phi3ops.errors import RegressionError
from tests.artifacts import latest_artifact_data

NAME = "phi3-nightly"
# The tiny Phi-3 answers gibberish (pass rate 0) and its speed is noise on a shared machine:
# these gates keep only what a regression of this model could break here.
STEADY = {
    "min_pass_rate": 0.0,
    "min_tokens_per_s": 0.0,
    "max_tokens_per_s_drop": 1.0,
    "max_ttft_increase": 100.0,
    "max_s_per_token_increase": 100.0,
}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_phi3) -> Iterator[dict]:
    """The tiny ONNX Phi-3 as @champion of NAME, evaluated once on the smoke set, in a store
    the module's tests share: each re-evaluates it, none changes what the next one starts from
    (a re-evaluation adds a run; the version and its aliases stay).
    """
    from mlflow import MlflowClient

    from offline.packaged import register_both_flavors
    from phi3ops.settings import get_settings
    from tasks.evaluation import evaluate_model

    data_dir = tmp_path_factory.mktemp("reevaluate-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHI3OPS_DATA_DIR", str(data_dir))
        mp.setenv("PHI3OPS_EVAL_TTFT_SAMPLES", "0")
        get_settings.cache_clear()
        version = register_both_flavors(tiny_phi3, model_name=NAME)["onnx"].version
        earlier = evaluate_model(f"models:/{NAME}/{version}", "smoke")
        MlflowClient().set_registered_model_alias(NAME, "champion", version)
        yield {"version": version, "earlier": earlier, "data_dir": data_dir}
    get_settings.cache_clear()


@pytest.fixture
def champion(registered, monkeypatch) -> dict:
    """The module's champion, this test's events (the emitter records instead of sending)."""
    import flows.reevaluate
    from phi3ops.settings import get_settings

    monkeypatch.setenv("PHI3OPS_DATA_DIR", str(registered["data_dir"]))
    monkeypatch.setenv("PHI3OPS_EVAL_TTFT_SAMPLES", "0")
    get_settings.cache_clear()
    events: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(
        flows.reevaluate,
        "emit",
        lambda event, *, model_name, version, payload: events.append((event, version, payload)),
    )
    return {**registered, "events": events}


def test_a_steady_champion_is_re_evaluated_from_scratch(champion) -> None:
    from flows.reevaluate import reevaluate_flow
    from tasks.evaluation import find_evaluation

    eval_set_hash = champion["earlier"].eval_set_hash
    # The version's latest evaluation: the module's first, or another test's re-evaluation.
    earlier = find_evaluation(NAME, champion["version"], eval_set_hash)
    assert earlier is not None
    decision = reevaluate_flow(model_name=NAME, eval_set="smoke", gates=STEADY)
    assert decision.promote, decision.reasons
    gates = {g.gate for g in decision.gates}
    assert {"pass_rate vs earlier run", "error_rate vs earlier run"} <= gates
    ((event, version, payload),) = champion["events"]
    assert (event, version) == ("phi3ops.model.re-evaluated", champion["version"])
    assert payload["earlier_run_id"] == earlier.run_id
    fresh = find_evaluation(NAME, champion["version"], eval_set_hash)
    assert fresh.run_id == payload["fresh_run_id"] != earlier.run_id  # generated anew
    assert "no regression" in latest_artifact_data("reevaluation-phi3-nightly")


def test_a_champion_below_its_gates_fails_the_run_and_says_why(champion) -> None:
    from flows.reevaluate import reevaluate_flow

    with pytest.raises(RegressionError, match=r"pass_rate: 0 < 0\.5"):
        reevaluate_flow(model_name=NAME, eval_set="smoke", gates=STEADY | {"min_pass_rate": 0.5})
    ((event, _, payload),) = champion["events"]
    assert event == "phi3ops.model.regressed"
    assert any("pass_rate" in reason for reason in payload["reasons"])
    assert "REGRESSED" in latest_artifact_data("reevaluation-phi3-nightly")


def test_bad_gate_names_fail_before_any_work(champion) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.reevaluate import reevaluate_flow
    from phi3ops.errors import InvalidInputError

    # The typed parameter refuses it, as the Prefect UI form would, before the flow runs.
    with pytest.raises((InvalidInputError, ParameterTypeError), match="min_pass_rat"):
        reevaluate_flow(model_name=NAME, gates={"min_pass_rat": 0.5})
    assert champion["events"] == []
