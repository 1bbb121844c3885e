"""The online verdict end to end against a real (SQLite) store: two weightless versions, each
evaluated (records of good metrics) so the promotion gates pass, a traffic plan, and synthetic
inference records of both arms stored as traces the way the server stores them.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from phi3ops.evalset import open_eval_set
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS, PREVIOUS_ALIAS, EvalTag
from phi3ops.registry import alias_version
from phi3ops.serving.records import InferenceRecord, InferenceRecorder, write_entries
from phi3ops.traffic import TrafficPlan, read_plan, write_plan
from tasks.evaluation import evaluation_tag_key

pytestmark = pytest.mark.usefixtures("prefect_harness")

NAME = "phi3-canary"
GOOD = {"pass_rate": 0.8, "latency_p95_s": 2.0, "tokens_per_s": 40.0, "error_rate": 0.0}
# Small enough for a test to write, large enough for the tests to mean something.
THRESHOLDS = {"min_samples": 60, "alpha": 0.01}


@pytest.fixture
def canary(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Versions 1 (@champion) and 2 (@candidate) of NAME, both evaluated on the default set, a
    canary plan started now, and the events emitted (by the verdict and the promotion).
    """
    from mlflow import MlflowClient

    import flows.canary
    import tasks.promotion
    from phi3ops.tracking import configure_tracking

    experiment = configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    eval_hash = open_eval_set(None).content_hash
    for version in ("1", "2"):
        client.create_model_version(NAME, source="weights")
        tags = {
            EvalTag.MODEL_NAME.value: NAME,
            EvalTag.MODEL_VERSION.value: version,
            EvalTag.MODEL_URI.value: f"models:/{NAME}/{version}",
            EvalTag.EVAL_SET.value: "phi3-default",
            EvalTag.EVAL_SET_HASH.value: eval_hash,
        }
        run_id = client.create_run(experiment, tags=tags).info.run_id
        for key, value in GOOD.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id)
        client.set_model_version_tag(NAME, version, evaluation_tag_key(eval_hash), run_id)
    client.set_registered_model_alias(NAME, CHAMPION_ALIAS, "1")
    client.set_registered_model_alias(NAME, CANDIDATE_ALIAS, "2")
    plan = TrafficPlan.start("canary", share=0.5, candidate_version="2")
    write_plan(NAME, plan)

    events: list[tuple[str, str, dict]] = []

    def record(event, *, model_name, version, payload, event_id=None):
        events.append((event, version, payload))

    monkeypatch.setattr(flows.canary, "emit", record)
    monkeypatch.setattr(tasks.promotion, "emit", record)
    return {"client": client, "plan": plan, "events": events}


def _write(
    version: str,
    arm: str,
    n: int,
    *,
    errors: int = 0,
    shadow: bool = False,
    max_tokens: int | None = None,
) -> None:
    """``n`` records of one arm, the last ``errors`` of them server errors, stored as traces;
    with ``max_tokens=1``, answers of one token, cut off, every third one blank.
    """
    import mlflow

    from phi3ops.settings import get_settings
    from phi3ops.tracking import configure_tracking

    experiment_id = configure_tracking(get_settings().inference_experiment_name)
    configure_tracking()  # runs go to the default experiment again
    recorder = InferenceRecorder(
        model_name=NAME, model_version=version, experiment_id=experiment_id
    )
    now = time.time()
    entries = []
    for i in range(n):
        record = InferenceRecord(
            timestamp=now + i * 1e-3,
            model_name=NAME,
            model_version=version,
            latency_s=1.0 + 0.01 * (i % 11),
            response="An answer." + " more" * (i % 4),
            finish_reason="stop",
            prompt_tokens=12,
            completion_tokens=20 + i % 4,
            context_tokens=4096,
            arm=arm,
            shadow=shadow,
            max_tokens=max_tokens,
            stream=False,
        )
        if max_tokens == 1:
            record = dataclasses.replace(
                record,
                latency_s=0.3 + 0.01 * (i % 5),
                response=" " if i % 3 == 0 else "An",
                finish_reason="length",
                completion_tokens=1,
            )
        if i >= n - errors:
            record = dataclasses.replace(
                record,
                status_code=500,
                outcome="error",
                error="HTTP 500",
                response=None,
                finish_reason=None,
                completion_tokens=None,
            )
        entries.append(recorder.entry(record))
    write_entries(entries, tracking_uri=mlflow.get_tracking_uri())


def _verdict(**thresholds):
    from flows.canary import canary_flow

    return canary_flow(model_name=NAME, thresholds={**THRESHOLDS, **thresholds})


def _canary_tags(client, version: str) -> dict[str, str]:
    tags = client.get_model_version(NAME, version).tags
    return {k.removeprefix("phi3ops.canary."): v for k, v in tags.items() if "canary." in k}


def test_too_few_records_is_wait_and_nothing_moves(canary) -> None:
    _write("2", "candidate", 10)
    _write("1", "champion", 80)
    _write("1", "champion", 30, shadow=True)  # not the champion's answers: never counted

    report = _verdict()

    assert report.outcome == "wait" and report.verdict == "wait"
    assert (report.candidate.judged, report.champion.judged) == (10, 80)
    assert report.needed == {"candidate": 50, "champion": 0}
    assert "50 more candidate record(s)" in report.summary()
    assert read_plan(NAME) == canary["plan"]
    assert (alias_version(NAME, CHAMPION_ALIAS), alias_version(NAME, CANDIDATE_ALIAS)) == ("1", "2")
    assert canary["events"] == []
    assert _canary_tags(canary["client"], "2")["verdict"] == "wait"


def test_a_no_worse_candidate_is_promoted_through_the_gates(canary) -> None:
    import mlflow

    _write("2", "candidate", 80, errors=1)
    _write("1", "champion", 80, errors=1)

    report = _verdict()

    assert report.outcome == "promoted", report.summary()
    assert (alias_version(NAME, CHAMPION_ALIAS), alias_version(NAME, PREVIOUS_ALIAS)) == ("2", "1")
    assert read_plan(NAME) is None
    names = [(event, version) for event, version, _ in canary["events"]]
    assert names == [("phi3ops.model.promoted", "2"), ("phi3ops.canary.promoted", "2")]
    payload = canary["events"][-1][2]
    assert payload["candidate"]["judged"] == 80 and payload["mlflow_run_id"] == report.run_id
    assert {t["name"] for t in payload["tests"]} >= {"error-rate", "seconds-per-token"}
    tags = _canary_tags(canary["client"], "2")
    assert (tags["verdict"], tags["run_id"]) == ("promoted", report.run_id)
    assert canary["client"].get_model_version(NAME, "2").tags["phi3ops.promotion.decision"] == (
        "promoted"
    )
    run = mlflow.get_run(report.run_id)
    assert run.data.tags["phi3ops.run_type"] == "canary"
    assert run.data.metrics["candidate_judged"] == 80
    assert 0 < run.data.metrics["p_error_rate"] <= 1
    # Once promoted, @candidate is the champion: the next scheduled run has nothing to judge.
    assert _verdict().outcome == "no-canary"


def test_the_verdict_judges_and_promotes_the_version_the_plan_pinned(canary) -> None:
    # @candidate moves to a never-evaluated v3 mid-canary: the servers keep sending the
    # candidate's share to v2, the plan's version, so that is what is judged and promoted.
    client = canary["client"]
    client.create_model_version(NAME, source="weights")
    client.set_registered_model_alias(NAME, CANDIDATE_ALIAS, "3")
    _write("2", "candidate", 80, errors=1)
    _write("1", "champion", 80, errors=1)

    report = _verdict()

    assert (report.outcome, report.candidate_version) == ("promoted", "2"), report.summary()
    assert report.candidate is not None and report.candidate.judged == 80
    assert any("@candidate is now v3" in reason for reason in report.reasons), report.reasons
    assert alias_version(NAME, CHAMPION_ALIAS) == "2"
    assert "phi3ops.promotion.decision" not in client.get_model_version(NAME, "3").tags


def test_a_candidate_that_errors_more_is_aborted(canary) -> None:
    _write("2", "candidate", 80, errors=20)
    _write("1", "champion", 80)

    report = _verdict()

    assert report.outcome == "aborted"
    assert report.reasons[0].startswith("worse on live traffic: error-rate")
    assert read_plan(NAME) is None  # out of traffic
    assert alias_version(NAME, CHAMPION_ALIAS) == "1"
    assert alias_version(NAME, PREVIOUS_ALIAS) is None
    ((event, version, payload),) = canary["events"]
    assert (event, version) == ("phi3ops.canary.aborted", "2")
    assert payload["candidate"]["errors"] == 20 and payload["champion"]["errors"] == 0
    tags = _canary_tags(canary["client"], "2")
    assert tags["verdict"] == "aborted" and "error-rate" in tags["reason"]
    promotion = canary["client"].get_model_version(NAME, "2").tags
    assert promotion["phi3ops.promotion.decision"] == "aborted"
    # With the plan cleared, the next scheduled run has nothing to judge.
    assert _verdict().outcome == "no-canary"


def test_a_client_steering_the_candidates_users_to_max_tokens_1_cannot_abort_it(canary) -> None:
    """The red-team replay: the candidate is the champion's twin; a client that found which
    users land on it sent them max_tokens=1 requests (cut off, often blank, slow per token),
    while the champion's users sent normal ones. Only like requests are compared.
    """
    _write("2", "candidate", 70)
    _write("2", "candidate", 150, max_tokens=1)
    _write("1", "champion", 150)
    _write("1", "champion", 10, max_tokens=1)

    report = _verdict()

    assert report.outcome == "promoted", report.summary()
    assert (report.candidate.length_finishes, report.champion.length_finishes) == (150, 10)
    assert not any(t.worse for t in report.tests)
    assert alias_version(NAME, CHAMPION_ALIAS) == "2"


def test_a_candidate_worse_on_the_same_requests_is_aborted_despite_the_steering(canary) -> None:
    _write("2", "candidate", 70, errors=15)
    _write("2", "candidate", 150, max_tokens=1)
    _write("1", "champion", 150)
    _write("1", "champion", 10, max_tokens=1)

    report = _verdict()

    assert report.outcome == "aborted", report.summary()
    assert [t.name for t in report.tests if t.worse] == ["error-rate"]


def test_a_canary_end_rewrites_the_decision_description_and_status(canary) -> None:
    """An older offline decision (here "rejected", with its reasons) must not outlive the
    canary: the decision tag, its reasons, the description and `phi3ops status` say how the
    canary ended.
    """
    from tasks.status import refresh_description, version_status

    client = canary["client"]
    client.set_model_version_tag(NAME, "2", "phi3ops.promotion.decision", "rejected")
    client.set_model_version_tag(NAME, "2", "phi3ops.promotion.reasons", '["old: pass rate"]')
    refresh_description(NAME, "2")
    assert "rejected (old: pass rate)" in client.get_model_version(NAME, "2").description
    _write("2", "candidate", 80, errors=20)
    _write("1", "champion", 80)

    report = _verdict()

    assert report.outcome == "aborted"
    status = version_status(NAME, "2")
    assert status.promotion == "aborted"
    assert status.promotion_reasons[0].startswith("canary verdict on live traffic: aborted (run")
    assert report.run_id in status.promotion_reasons[0]
    assert any("error-rate" in r for r in status.promotion_reasons)
    assert not any("old: pass rate" in r for r in status.promotion_reasons)
    assert status.canary == "canary aborted"
    description = client.get_model_version(NAME, "2").description
    assert "- promotion: aborted (canary verdict on live traffic" in description
    assert "old: pass rate" not in description


def test_a_canary_promotion_says_so_in_the_decision(canary) -> None:
    from tasks.status import version_status

    _write("2", "candidate", 80)
    _write("1", "champion", 80)

    report = _verdict()

    assert report.outcome == "promoted"
    status = version_status(NAME, "2")
    assert status.promotion == "promoted"
    assert status.promotion_reasons[0].startswith("canary verdict on live traffic: promoted")
    assert "canary verdict on live traffic: promoted" in (
        canary["client"].get_model_version(NAME, "2").description
    )


def test_ending_a_plan_leaves_one_started_since_alone(canary) -> None:
    from phi3ops.settings import get_settings
    from tasks.canary import end_plan, find_target, judge

    report, _ = judge(
        find_target(NAME), policy=get_settings().canary, thresholds=get_settings().monitor
    )
    assert report.outcome == "wait" and report.plan_id == canary["plan"].id
    newer = TrafficPlan.start("shadow", candidate_version="2")
    write_plan(NAME, newer)  # `phi3ops canary start` again while the verdict ran
    assert end_plan(report) is False
    assert read_plan(NAME) == newer


def test_gates_that_reject_a_no_worse_candidate_abort_it(canary) -> None:
    _write("2", "candidate", 70)
    _write("1", "champion", 70)
    from flows.canary import canary_flow

    report = canary_flow(model_name=NAME, thresholds=THRESHOLDS, gates={"min_pass_rate": 0.9})

    assert report.outcome == "aborted" and report.verdict == "promote"
    assert "promotion gates rejected it" in report.reasons[0]
    assert read_plan(NAME) is None and alias_version(NAME, CHAMPION_ALIAS) == "1"
    assert [e[0] for e in canary["events"]] == ["phi3ops.model.rejected", "phi3ops.canary.aborted"]


def test_promotion_in_canary_mode_starts_live_traffic_instead_of_moving_aliases(canary) -> None:
    """promote_flow(live_traffic=...): a version that passes every gate goes to live traffic
    (the plan, under the alias lock), the aliases stay; the verdict promotes it later.
    """
    from flows.promote import promote_flow
    from tasks.canary import stop_plan

    assert stop_plan(NAME, plan_id="another plan") is None  # a verdict never ends another's
    assert stop_plan(NAME) == canary["plan"]
    decision = promote_flow(
        model_name=NAME, candidate="2", live_traffic="shadow", evaluate_champion=False
    )
    assert decision.promote and decision.live_traffic == "shadow"
    plan = read_plan(NAME)
    assert plan is not None and plan.mode.value == "shadow" and plan.candidate_version == "2"
    assert alias_version(NAME, CHAMPION_ALIAS) == "1"  # nothing moved yet
    assert [e for e, _, _ in canary["events"]] == []  # no promotion event either
    with pytest.raises(ValueError, match="not @candidate"):
        promote_flow(model_name=NAME, candidate="1", live_traffic="canary")
