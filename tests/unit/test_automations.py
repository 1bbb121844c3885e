"""The automations as code (deployments/automations.py): triggers, actions, idempotent apply."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from uuid import UUID, uuid4

import pytest
from prefect.events.actions import RunDeployment, SendNotification
from typer.testing import CliRunner

from deployments import automations
from phi3ops.errors import OrchestrationError
from phi3ops.names import MONITORING_FAILED_EVENT as FAILED_EVENT
from phi3ops.names import PROMOTED_EVENT
from tasks.events import emit

MONITOR_ID, ROLLBACK_ID, BLOCK_ID = uuid4(), uuid4(), uuid4()


def _by_name(**kwargs) -> dict[str, automations.Automation]:
    built = automations.build_automations(
        monitor_deployment_id=MONITOR_ID, notification_block_id=BLOCK_ID, **kwargs
    )
    return {a.name: a for a in built}


def test_promotion_runs_the_monitor_deployment_on_the_promoted_model() -> None:
    auto = _by_name()[automations.MONITOR_AFTER_PROMOTION]

    assert auto.trigger.expect == {PROMOTED_EVENT}
    assert auto.trigger.posture == "Reactive"
    assert auto.trigger.threshold == 1
    assert auto.trigger.match.model_dump() == {"prefect.resource.id": "phi3ops.model.*"}
    assert auto.trigger.for_each == {"prefect.resource.id"}
    (action,) = auto.actions
    assert isinstance(action, RunDeployment)
    assert action.source == "selected"
    assert action.deployment_id == MONITOR_ID
    assert action.parameters["alias"] == "champion"
    # The run waits for the new champion's first full window, then reads exactly that window.
    assert action.schedule_after == timedelta(minutes=60)
    assert action.parameters["window_minutes"] == 60
    # Rendered by the server from the event; tasks.promotion.emit puts the name in this label.
    assert action.parameters["model_name"] == {
        "__prefect_kind": "jinja",
        "template": "{{ event.resource['phi3ops.model_name'] }}",
    }


def test_the_monitor_after_promotion_waits_for_the_configured_window(monkeypatch) -> None:
    from phi3ops.settings import get_settings

    monkeypatch.setenv("PHI3OPS_MONITOR_WINDOW_MINUTES", "15")
    get_settings.cache_clear()
    (action,) = _by_name()[automations.MONITOR_AFTER_PROMOTION].actions
    assert (action.schedule_after, action.parameters["window_minutes"]) == (
        timedelta(minutes=15),
        15,
    )
    (action,) = _by_name(monitor_window_minutes=5)[automations.MONITOR_AFTER_PROMOTION].actions
    assert action.schedule_after == timedelta(minutes=5)


def test_monitoring_failure_notifies_only_by_default() -> None:
    auto = _by_name()[automations.ON_MONITORING_FAILED]

    assert auto.trigger.expect == {FAILED_EVENT} == {"phi3ops.monitoring.failed"}
    assert auto.trigger.match.model_dump() == {"prefect.resource.id": "phi3ops.model.*"}
    (action,) = auto.actions
    assert isinstance(action, SendNotification)
    assert action.block_document_id == BLOCK_ID
    assert "{{ event.resource['prefect.resource.name'] }}" in action.subject
    assert "prefect deployment run rollback/rollback" in action.body


def test_a_nightly_regression_notifies() -> None:
    from phi3ops.names import REGRESSED_EVENT

    auto = _by_name()[automations.ON_REGRESSION]
    assert auto.trigger.expect == {REGRESSED_EVENT} == {"phi3ops.model.regressed"}
    (action,) = auto.actions
    assert isinstance(action, SendNotification) and action.block_document_id == BLOCK_ID
    assert "event.payload.reasons" in action.body
    assert "rollback/rollback" in action.body


@pytest.mark.parametrize(
    ("name", "event", "words"),
    [
        ("ON_CANARY_ABORTED", "phi3ops.canary.aborted", "phi3ops canary start"),
        ("ON_CANARY_PROMOTED", "phi3ops.canary.promoted", "monitor-after-promotion"),
    ],
)
def test_canary_verdicts_notify_with_their_reasons(name, event, words) -> None:
    auto = _by_name()[getattr(automations, name)]
    assert auto.trigger.expect == {event}
    assert auto.trigger.match.model_dump() == {"prefect.resource.id": "phi3ops.model.*"}
    (action,) = auto.actions  # a promotion's own phi3ops.model.promoted starts the monitor
    assert isinstance(action, SendNotification) and action.block_document_id == BLOCK_ID
    assert "event.payload.reasons" in action.body and words in action.body


def test_the_canary_events_match_their_triggers(monkeypatch) -> None:
    from prefect.events.schemas.events import Resource

    from phi3ops.names import CANARY_ABORTED_EVENT

    sent: list[dict] = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **kw: sent.append(kw))
    emit(CANARY_ABORTED_EVENT, model_name="phi3-mini", version="4", payload={"reasons": []})
    trigger = _by_name()[automations.ON_CANARY_ABORTED].trigger
    assert sent[0]["event"] in trigger.expect
    assert trigger.match.matches(Resource.model_validate(sent[0]["resource"]))


def test_monitoring_failure_also_rolls_back_when_enabled() -> None:
    auto = _by_name(rollback_deployment_id=ROLLBACK_ID)[automations.ON_MONITORING_FAILED]

    notify, rollback = auto.actions
    assert isinstance(notify, SendNotification)
    assert "was started" in notify.body
    assert isinstance(rollback, RunDeployment)
    assert rollback.deployment_id == ROLLBACK_ID
    assert set(rollback.parameters) == {"model_name", "triggered_by"}
    assert "{{ event.id }}" in rollback.parameters["triggered_by"]["template"]


def test_the_server_accepts_the_definitions_and_their_templates() -> None:
    # The server's own models validate every Jinja template and parameter placeholder.
    from prefect.server.events.schemas.automations import AutomationCore

    for auto in _by_name(rollback_deployment_id=ROLLBACK_ID).values():
        AutomationCore.model_validate(auto.model_dump(mode="json", exclude={"id"}))


def test_the_events_the_pipeline_emits_match_the_triggers(monkeypatch) -> None:
    from prefect.events.schemas.automations import ResourceSpecification
    from prefect.events.schemas.events import Resource

    sent: list[dict] = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **kw: sent.append(kw))
    emit(PROMOTED_EVENT, model_name="phi3-mini", version="3", payload={})
    resource = Resource.model_validate(sent[0]["resource"])

    spec: ResourceSpecification = _by_name()[automations.MONITOR_AFTER_PROMOTION].trigger.match
    assert spec.matches(resource)
    assert resource["phi3ops.model_name"] == "phi3-mini"


# --- apply: against a fake API client ---------------------------------------------------------


class FakeClient:
    def __init__(self, deployments=(), blocks=(), automations_=()) -> None:
        self.api_url = "http://prefect.test/api/"
        self.deployments = {name: uuid4() for name in deployments}
        self.blocks = list(blocks)
        self.automations = list(automations_)
        self.calls: list[tuple[str, object]] = []

    def read_deployment_by_name(self, name: str):
        from prefect.exceptions import ObjectNotFound

        if name not in self.deployments:
            raise ObjectNotFound(http_exc=Exception(name))
        return SimpleNamespace(id=self.deployments[name])

    def request(self, method: str, path: str, json: dict):
        assert (method, path) == ("POST", "/block_documents/filter")
        (name,) = json["block_documents"]["name"]["any_"]
        found = [b for b in self.blocks if b["name"] == name]
        return SimpleNamespace(json=lambda: found)

    def read_automations_by_name(self, name: str):
        return [a for a in self.automations if a.name == name]

    def create_automation(self, core) -> UUID:
        new = SimpleNamespace(id=uuid4(), name=core.name, core=core)
        self.automations.append(new)
        self.calls.append(("create", core.name))
        return new.id

    def update_automation(self, automation_id: UUID, core) -> None:
        for a in self.automations:
            if a.id == automation_id:
                a.core = core
        self.calls.append(("update", core.name))

    def delete_automation(self, automation_id: UUID) -> None:
        self.automations = [a for a in self.automations if a.id != automation_id]
        self.calls.append(("delete", automation_id))


def _block(name: str, capabilities: list[str], type_name: str = "Custom Webhook") -> dict:
    schema_id, type_id = str(uuid4()), str(uuid4())
    return {
        "id": str(uuid4()),
        "name": name,
        "data": {},
        "block_schema_id": schema_id,
        "block_schema": {
            "id": schema_id,
            "checksum": "x",
            "fields": {},
            "block_type_id": type_id,
            "capabilities": capabilities,
        },
        "block_type_id": type_id,
        "block_type_name": type_name,
        "is_anonymous": False,
    }


@pytest.fixture
def fake_api(monkeypatch):
    from contextlib import contextmanager

    client = FakeClient(
        deployments=[automations.MONITOR_DEPLOYMENT, automations.ROLLBACK_DEPLOYMENT],
        blocks=[_block("phi3ops-alerts", ["notify"])],
    )

    @contextmanager
    def fake():
        yield client

    monkeypatch.setattr(automations, "server_client", fake)
    return client


def test_apply_creates_then_updates_by_name_never_duplicates(fake_api) -> None:
    first = automations.apply_automations()
    second = automations.apply_automations()

    assert [a.action for a in first] == ["created"] * 5
    assert [a.action for a in second] == ["updated"] * 5
    assert [a.id for a in first] == [a.id for a in second]
    assert len(fake_api.automations) == 5


def test_apply_removes_duplicates_of_a_name(fake_api) -> None:
    automations.apply_automations()
    stray = SimpleNamespace(id=uuid4(), name=automations.ON_MONITORING_FAILED)
    fake_api.automations.append(stray)

    automations.apply_automations()

    assert ("delete", stray.id) in fake_api.calls
    assert sorted(a.name for a in fake_api.automations) == sorted(
        [
            automations.MONITOR_AFTER_PROMOTION,
            automations.ON_MONITORING_FAILED,
            automations.ON_REGRESSION,
            automations.ON_CANARY_ABORTED,
            automations.ON_CANARY_PROMOTED,
        ]
    )


def test_apply_follows_the_rollback_setting(fake_api, monkeypatch) -> None:
    from phi3ops.settings import get_settings

    def failure_actions() -> list[str]:
        (auto,) = [a for a in fake_api.automations if a.name == automations.ON_MONITORING_FAILED]
        return [action.type for action in auto.core.actions]

    automations.apply_automations()
    assert failure_actions() == ["send-notification"]

    monkeypatch.setenv("PHI3OPS_MONITOR_ROLLBACK_ON_FAILURE", "true")
    get_settings.cache_clear()
    automations.apply_automations()
    assert failure_actions() == ["send-notification", "run-deployment"]

    automations.apply_automations(rollback_on_failure=False)  # turning it off removes it
    assert failure_actions() == ["send-notification"]


def test_apply_names_the_fix_for_a_missing_deployment(fake_api) -> None:
    del fake_api.deployments[automations.MONITOR_DEPLOYMENT]

    with pytest.raises(OrchestrationError, match=r"'monitor/monitor'.*prefect deploy --all"):
        automations.apply_automations()
    assert fake_api.automations == []


def test_rollback_deployment_is_needed_only_when_rollback_is_on(fake_api) -> None:
    del fake_api.deployments[automations.ROLLBACK_DEPLOYMENT]

    automations.apply_automations(rollback_on_failure=False)
    with pytest.raises(OrchestrationError, match="'rollback/rollback'"):
        automations.apply_automations(rollback_on_failure=True)


def test_apply_names_the_fix_for_a_missing_or_unusable_block(fake_api, monkeypatch) -> None:
    monkeypatch.setenv("PHI3OPS_NOTIFICATION_BLOCK", "team-pager")
    from phi3ops.settings import get_settings

    get_settings.cache_clear()
    with pytest.raises(OrchestrationError, match=r"'team-pager' does not exist.*--create-webhook"):
        automations.apply_automations()

    fake_api.blocks.append(_block("team-pager", [], type_name="Secret"))
    with pytest.raises(OrchestrationError, match=r"'team-pager' \(Secret\) cannot send"):
        automations.apply_automations()

    fake_api.blocks.append(_block("team-pager", ["notify"], type_name="Slack Webhook"))
    applied = automations.apply_automations()
    assert [a.action for a in applied] == ["created"] * 5


def test_no_prefect_server_configured_is_a_clear_error(monkeypatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(OrchestrationError, match="PREFECT_API_URL is not set"),
    ):
        automations.apply_automations()


def test_cli_apply_reports_each_automation(fake_api) -> None:
    from cli.app import app

    result = CliRunner().invoke(app, ["automations", "apply", "--rollback"])

    assert result.exit_code == 0, result.output
    assert f"created automation {automations.MONITOR_AFTER_PROMOTION}" in result.output
    assert f"created automation {automations.ON_MONITORING_FAILED}" in result.output
    assert f"created automation {automations.ON_REGRESSION}" in result.output
    assert f"created automation {automations.ON_CANARY_ABORTED}" in result.output


def test_cli_apply_error_is_a_message_and_exit_code_2(fake_api) -> None:
    from cli.app import app

    fake_api.deployments.clear()
    result = CliRunner().invoke(app, ["automations", "apply"])

    assert result.exit_code == 2
    assert "prefect deploy --all" in result.output
