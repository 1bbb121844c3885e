"""Promotion and rollback against a real (SQLite) registry; evaluations stand in as records."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from phi3ops.errors import RegistryError
from phi3ops.names import CHAMPION_ALIAS, PREVIOUS_ALIAS
from phi3ops.registry import alias_version
from phi3ops.settings import get_settings
from tasks.promotion import AliasState, apply_decision, evaluate_gates, rollback

NAME = "phi3-promo"
HASH = "c" * 64
GOOD = {"pass_rate": 0.8, "latency_p95_s": 2.0, "tokens_per_s": 40.0, "error_rate": 0.0}


@dataclass
class Eval:
    version: str
    metrics: dict[str, float] = field(default_factory=lambda: dict(GOOD))
    eval_set_hash: str = HASH
    run_id: str = "eval-run"


@pytest.fixture
def registry(isolated_settings):
    """Three weightless versions of NAME in this test's SQLite store."""
    from mlflow import MlflowClient

    from phi3ops.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(isolated_settings / "weights"))
    return client


def _promote(version: str, metrics: dict | None = None) -> AliasState:
    champion = alias_version(NAME, CHAMPION_ALIAS)
    decision = evaluate_gates(
        NAME,
        version,
        Eval(version, dict(metrics or GOOD)),
        Eval(champion) if champion else None,
        champion_version=champion,
        policy=get_settings().gates,
    )
    return apply_decision(decision, triggered_by="tests")


def _aliases() -> tuple[str | None, str | None]:
    return alias_version(NAME, CHAMPION_ALIAS), alias_version(NAME, PREVIOUS_ALIAS)


def test_first_promotion_then_pass_moves_previous(registry) -> None:
    assert _promote("1").action == "promoted"
    assert _aliases() == ("1", None)
    state = _promote("2")
    assert (state.action, state.champion, state.previous) == ("promoted", "2", "1")
    assert _aliases() == ("2", "1")
    tags = registry.get_model_version(NAME, "2").tags
    assert tags["phi3ops.promotion.decision"] == "promoted"
    assert tags["phi3ops.promotion.champion_before"] == "1"
    assert tags["phi3ops.promotion.triggered_by"] == "tests"


def test_failing_gate_leaves_aliases_untouched_and_records_why(registry) -> None:
    _promote("1")
    state = _promote("2", GOOD | {"error_rate": 0.5})
    assert state.action == "rejected"
    assert _aliases() == ("1", None)
    tags = registry.get_model_version(NAME, "2").tags
    assert tags["phi3ops.promotion.decision"] == "rejected"
    assert "error_rate" in tags["phi3ops.promotion.reasons"]


def test_rerunning_the_same_promotion_is_a_no_op(registry) -> None:
    _promote("1")
    _promote("2")
    stamp = registry.get_model_version(NAME, "2").tags["phi3ops.promotion.at"]
    state = _promote("2")
    assert (state.action, state.changed) == ("unchanged", False)
    assert _aliases() == ("2", "1")  # previous did not shift onto 2
    assert registry.get_model_version(NAME, "2").tags["phi3ops.promotion.at"] == stamp


def test_the_champion_failing_stricter_gates_is_not_tagged_rejected(registry) -> None:
    _promote("1")
    stamp = registry.get_model_version(NAME, "1").tags["phi3ops.promotion.at"]
    state = _promote("1", GOOD | {"error_rate": 0.5})
    assert (state.action, state.changed) == ("unchanged", False)
    tags = registry.get_model_version(NAME, "1").tags
    assert tags["phi3ops.promotion.decision"] == "promoted"
    assert tags["phi3ops.promotion.at"] == stamp


def test_racing_promotions_apply_no_decision_taken_against_another_champion(registry) -> None:
    _promote("1")
    start = threading.Barrier(2)
    results: dict[str, AliasState] = {}

    def race(version: str) -> None:
        champion = "1"  # both decided against the same champion before either moved
        decision = evaluate_gates(
            NAME,
            version,
            Eval(version),
            Eval(champion),
            champion_version=champion,
            policy=get_settings().gates,
        )
        start.wait()
        results[version] = apply_decision(decision, triggered_by=f"racer-{version}")

    threads = [threading.Thread(target=race, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    champion, previous = _aliases()
    assert champion in {"2", "3"}
    loser = ({"2", "3"} - {champion}).pop()
    assert previous == "1"  # the loser never replaced a champion it was not compared with
    assert (results[champion].action, results[champion].previous) == ("promoted", "1")
    assert (results[loser].action, results[loser].changed) == ("stale", False)
    assert results[loser].champion == champion  # what the flow decides against next
    assert "phi3ops.promotion.decision" not in registry.get_model_version(NAME, loser).tags


def test_rollback_restores_previous_and_clears_it(registry) -> None:
    _promote("1")
    _promote("2")
    state = rollback(NAME, triggered_by="tests")
    assert (state.champion, state.previous, state.action) == ("1", None, "rolled-back")
    assert _aliases() == ("1", None)
    assert "phi3ops.rolled_back_at" in registry.get_model_version(NAME, "2").tags
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(NAME, triggered_by="tests")
    assert _aliases() == ("1", None)  # nothing changed


def test_rollback_to_a_named_version_and_the_errors(registry) -> None:
    with pytest.raises(RegistryError, match="no champion"):
        rollback(NAME, triggered_by="tests")
    _promote("1")
    with pytest.raises(RegistryError, match="already the champion"):
        rollback(NAME, to_version="1", triggered_by="tests")
    state = rollback(NAME, to_version="3", triggered_by="tests")
    assert state.champion == "3"
    assert _aliases() == ("3", None)


# --- the flows, with evaluations looked up from a table and events recorded --------------------


@pytest.fixture
def flows_env(registry, monkeypatch):
    """Evaluations by version, the default eval set's hash, and a list of emitted events."""
    import flows.promote
    import tasks.promotion
    from phi3ops.evalset import load_eval_set, resolve_eval_set

    default_hash = load_eval_set(resolve_eval_set(None)).content_hash
    evaluations: dict[str, Eval] = {}
    events: list[tuple[str, str, dict]] = []

    def evaluation(version: str, metrics: dict | None = None) -> None:
        evaluations[version] = Eval(version, dict(metrics or GOOD), eval_set_hash=default_hash)

    monkeypatch.setattr(
        flows.promote, "find_evaluation_task", lambda name, version, h: evaluations.get(version)
    )

    def record(event, *, model_name, version, payload, event_id=None):
        events.append((event, version, payload))

    monkeypatch.setattr(tasks.promotion, "emit", record)
    return evaluation, events


@pytest.mark.usefixtures("prefect_harness")
def test_promote_flow_records_decision_and_emits_events(flows_env, registry) -> None:
    from flows.promote import promote_flow

    evaluation, events = flows_env
    registry.set_registered_model_alias(NAME, "candidate", "1")
    assert not promote_flow(model_name=NAME).promote  # no evaluation yet
    assert events[-1][0] == "phi3ops.model.rejected"
    assert "no evaluation" in events[-1][2]["reasons"][0]

    evaluation("1")
    assert promote_flow(model_name=NAME).promote
    assert events[-1][:2] == ("phi3ops.model.promoted", "1")
    assert _aliases() == ("1", None)

    evaluation("2", GOOD | {"pass_rate": 0.5})
    decision = promote_flow(model_name=NAME, candidate="2")
    assert not decision.promote
    assert events[-1][0] == "phi3ops.model.rejected"
    assert _aliases() == ("1", None)

    # A per-run override of the policy lets it through; then a re-run does nothing.
    overrides = {"min_pass_rate": 0.4, "max_pass_rate_drop": 0.5}
    assert promote_flow(model_name=NAME, candidate="2", gates=overrides).promote
    assert _aliases() == ("2", "1")
    count = len(events)
    promote_flow(model_name=NAME, candidate="2", gates=overrides)
    assert len(events) == count  # no-op: no event, no new record

    import mlflow

    runs = mlflow.search_runs(filter_string="tags.`phi3ops.run_type` = 'promotion'")
    assert sorted(runs["tags.phi3ops.decision"]) == ["promoted", "promoted", "rejected", "rejected"]


@pytest.mark.usefixtures("prefect_harness")
def test_rollback_flow_emits_and_refuses_when_nothing_to_roll_back(flows_env) -> None:
    from flows.rollback import rollback_flow

    _, events = flows_env
    _promote("1")
    with pytest.raises(RegistryError, match="no previous"):
        rollback_flow(model_name=NAME, smoke_eval_set=None)
    assert [e for e in events if e[0] == "phi3ops.model.rolled-back"] == []
    _promote("2")
    state = rollback_flow(model_name=NAME, smoke_eval_set=None)
    assert (state.champion, state.resumed) == ("1", False)
    assert events[-1] == ("phi3ops.model.rolled-back", "1", events[-1][2])
    assert events[-1][2]["triggered_by"] and events[-1][2]["rolled_back"] == "2"


@pytest.mark.usefixtures("prefect_harness")
def test_promote_flow_decides_again_when_the_champion_moves_before_it_applies(
    flows_env, registry, monkeypatch
) -> None:
    """Version 3 is decided against champion 1, but version 2 wins the race to the lock: the
    flow decides again against version 2 (evaluating it on the same set), and version 3, worse
    than version 2, is rejected with version 2 named as the champion it was compared with.
    """
    import flows.promote
    from flows.promote import promote_flow

    evaluation, events = flows_env
    _promote("1")
    evaluation("1")
    evaluation("3")  # as good as version 1, worse than version 2
    decided_against: list[str | None] = []
    evaluated: list[str] = []
    apply = flows.promote.apply_decision_task

    def racing(decision, *, triggered_by):
        decided_against.append(decision.champion_version)
        if len(decided_against) == 1:  # another promotion takes the lock first
            assert _promote("2", GOOD | {"pass_rate": 1.0}).action == "promoted"
        return apply(decision, triggered_by=triggered_by)

    def evaluate(*, model_uri, eval_set):
        evaluated.append(model_uri)
        evaluation("2", GOOD | {"pass_rate": 1.0})
        return flows.promote.find_evaluation_task(NAME, "2", "")

    monkeypatch.setattr(flows.promote, "apply_decision_task", racing)
    monkeypatch.setattr(flows.promote, "evaluate_flow", evaluate)
    decision = promote_flow(model_name=NAME, candidate="3")

    assert decided_against == ["1", "2"]
    assert evaluated == [f"models:/{NAME}/2"]
    assert (decision.champion_version, decision.promote) == ("2", False)
    assert any("pass_rate vs champion" in r for r in decision.reasons)
    assert _aliases() == ("2", "1")
    tags = registry.get_model_version(NAME, "3").tags
    assert (tags["phi3ops.promotion.decision"], tags["phi3ops.promotion.champion_before"]) == (
        "rejected",
        "2",
    )
    assert events[-1][:2] == ("phi3ops.model.rejected", "3")
    assert events[-1][2]["champion"] == "2"


def test_a_pointer_without_its_plan_is_dropped_and_the_promotion_goes_ahead(registry) -> None:
    """A process that died between writing the intent's pointer and its plan moved nothing."""
    from tasks.promotion import pending_intent

    registry.set_registered_model_tag(NAME, "phi3ops.intent", '{"id": "x", "version": "2"}')
    assert pending_intent(NAME) is None
    assert _promote("1").action == "promoted"
    assert "phi3ops.intent" not in registry.get_registered_model(NAME).tags
    assert _aliases() == ("1", None)
