"""Automations as code: what the Prefect server does when the pipeline's events arrive.

* ``phi3ops-monitor-after-promotion``: ``phi3ops.model.promoted`` -> run the ``monitor``
  deployment on the promoted model (its name comes from the event), scheduled one monitoring
  window (``PHI3OPS_MONITOR_WINDOW_MINUTES``) after the promotion, so the run reads a window of
  the new champion's traffic instead of ending "insufficient data" at once.
* ``phi3ops-on-monitoring-failed``: ``phi3ops.monitoring.failed`` -> a notification through the
  notification block named by ``PHI3OPS_NOTIFICATION_BLOCK``, and, with
  ``PHI3OPS_MONITOR_ROLLBACK_ON_FAILURE=true``, a run of the ``rollback`` deployment too.
* ``phi3ops-on-regression``: ``phi3ops.model.regressed`` (the nightly re-evaluation found the
  champion worse than before) -> a notification through the same block.
* ``phi3ops-on-canary-aborted``: ``phi3ops.canary.aborted`` (the online verdict took
  ``@candidate`` out of live traffic) -> a notification with the verdict's reasons, like a
  monitoring failure (nothing to roll back: the champion never moved).
* ``phi3ops-on-canary-promoted``: ``phi3ops.canary.promoted`` -> a notification. The promotion
  went through the promotion flow, whose ``phi3ops.model.promoted`` already schedules the
  monitor of the new champion (the first automation), so nothing else runs.

The definitions are pure functions of the ids they point at (`build_automations`);
`apply_automations` looks those ids up on the Prefect API (``PREFECT_API_URL``) and creates or
updates each automation by name, so applying twice changes nothing and never duplicates one.
``phi3ops automations apply`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from prefect.automations import Automation, EventTrigger, RunDeployment, SendNotification

from phi3ops.errors import OrchestrationError
from phi3ops.names import (
    CANARY_ABORTED_EVENT,
    CANARY_PROMOTED_EVENT,
    MODEL_RESOURCE_PREFIX,
    MONITORING_FAILED_EVENT,
    PROMOTED_EVENT,
    REGRESSED_EVENT,
)
from phi3ops.settings import get_settings

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

__all__ = [
    "MONITORING_FAILED_EVENT",
    "MONITOR_AFTER_PROMOTION",
    "MONITOR_DEPLOYMENT",
    "ON_CANARY_ABORTED",
    "ON_CANARY_PROMOTED",
    "ON_MONITORING_FAILED",
    "ON_REGRESSION",
    "ROLLBACK_DEPLOYMENT",
    "AppliedAutomation",
    "apply_automations",
    "build_automations",
    "create_webhook_block",
    "monitor_after_promotion",
    "on_canary_aborted",
    "on_canary_promoted",
    "on_monitoring_failed",
    "on_regression",
    "server_client",
]

# Deployments the automations run, as `prefect deployment run` names them (<flow>/<deployment>).
MONITOR_DEPLOYMENT = "monitor/monitor"
ROLLBACK_DEPLOYMENT = "rollback/rollback"

MONITOR_AFTER_PROMOTION = "phi3ops-monitor-after-promotion"
ON_MONITORING_FAILED = "phi3ops-on-monitoring-failed"
ON_REGRESSION = "phi3ops-on-regression"
ON_CANARY_ABORTED = "phi3ops-on-canary-aborted"
ON_CANARY_PROMOTED = "phi3ops-on-canary-promoted"
TAGS = ["phi3ops"]

# Every phi3ops model event is about the resource `phi3ops.model.<name>.<version>`, labelled
# with `phi3ops.model_name` and `phi3ops.model_version` (tasks.promotion.emit).
MODEL_RESOURCES = {"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}*"}
MODEL_NAME = "{{ event.resource['phi3ops.model_name'] }}"
MODEL = "{{ event.resource['prefect.resource.name'] }}"


def _jinja(template: str) -> dict[str, str]:
    """A deployment parameter the server renders from the triggering event (a string)."""
    return {"__prefect_kind": "jinja", "template": template}


def _on_each(event: str) -> EventTrigger:
    # Reactive, threshold 1: every event fires once; counted per model version.
    return EventTrigger(
        expect={event},
        match=MODEL_RESOURCES,
        for_each={"prefect.resource.id"},
        posture="Reactive",
        threshold=1,
        within=timedelta(0),
    )


def monitor_after_promotion(monitor_deployment_id: UUID, *, window_minutes: int) -> Automation:
    """``phi3ops.model.promoted`` -> one window later, monitor that model's champion.

    Args:
        monitor_deployment_id: The ``monitor`` deployment.
        window_minutes: The monitoring window: the run is scheduled this long after the
            promotion and reads this window, so it sees the new champion's first full window.
    """
    return Automation(
        name=MONITOR_AFTER_PROMOTION,
        description=(
            f"When a version is promoted ({PROMOTED_EVENT}), run the {MONITOR_DEPLOYMENT} "
            f"deployment on that model's champion {window_minutes} minutes later, over its "
            "first full window. Managed by `phi3ops automations apply`."
        ),
        tags=TAGS,
        trigger=_on_each(PROMOTED_EVENT),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=monitor_deployment_id,
                parameters={
                    "model_name": _jinja(MODEL_NAME),
                    "alias": "champion",
                    "window_minutes": window_minutes,
                },
                schedule_after=timedelta(minutes=window_minutes),
            )
        ],
    )


def on_monitoring_failed(
    notification_block_id: UUID, *, rollback_deployment_id: UUID | None = None
) -> Automation:
    """``phi3ops.monitoring.failed`` -> notify; with a rollback deployment, also roll back.

    Args:
        notification_block_id: The notification block (Slack, e-mail, custom webhook...) to
            send through.
        rollback_deployment_id: The rollback deployment to run as well; None: notify only.
    """
    if rollback_deployment_id is None:
        next_step = (
            f"Roll back with `prefect deployment run {ROLLBACK_DEPLOYMENT} --param "
            f'model_name="{MODEL_NAME}"` (or `phi3ops rollback`) if the champion is at fault.'
        )
    else:
        next_step = (
            f"A run of {ROLLBACK_DEPLOYMENT} was started: @champion goes back to @previous, "
            "then a smoke evaluation."
        )
    actions: list[Any] = [
        SendNotification(
            block_document_id=notification_block_id,
            subject=f"phi3ops: monitoring failed for {MODEL}",
            body=(
                f"Monitoring of {MODEL} failed at {{{{ event.occurred }}}}.\n"
                "Event {{ event.event }} ({{ event.id }}):\n"
                "{{ event.payload | tojson }}\n\n" + next_step
            ),
        )
    ]
    if rollback_deployment_id is not None:
        actions.append(
            RunDeployment(
                source="selected",
                deployment_id=rollback_deployment_id,
                parameters={
                    "model_name": _jinja(MODEL_NAME),
                    "triggered_by": _jinja(
                        f"automation {ON_MONITORING_FAILED} (event {{{{ event.id }}}})"
                    ),
                },
            )
        )
    return Automation(
        name=ON_MONITORING_FAILED,
        description=(
            f"When monitoring fails ({MONITORING_FAILED_EVENT}), notify"
            + (f" and run {ROLLBACK_DEPLOYMENT}" if rollback_deployment_id else "")
            + ". Managed by `phi3ops automations apply`."
        ),
        tags=TAGS,
        trigger=_on_each(MONITORING_FAILED_EVENT),
        actions=actions,
    )


def on_regression(notification_block_id: UUID) -> Automation:
    """``phi3ops.model.regressed`` -> notify (a person decides whether to roll back)."""
    return Automation(
        name=ON_REGRESSION,
        description=(
            f"When the nightly re-evaluation finds the champion regressed ({REGRESSED_EVENT}), "
            "notify. Managed by `phi3ops automations apply`."
        ),
        tags=TAGS,
        trigger=_on_each(REGRESSED_EVENT),
        actions=[
            SendNotification(
                block_document_id=notification_block_id,
                subject=f"phi3ops: {MODEL} regressed",
                body=(
                    f"The nightly re-evaluation of {MODEL} failed its gates at "
                    "{{ event.occurred }}:\n{{ event.payload.reasons | join('\n') }}\n\n"
                    f"Roll back with `prefect deployment run {ROLLBACK_DEPLOYMENT} --param "
                    f'model_name="{MODEL_NAME}"` (or `phi3ops rollback`) if it is the model.'
                ),
            )
        ],
    )


def on_canary_aborted(notification_block_id: UUID) -> Automation:
    """``phi3ops.canary.aborted`` -> notify (the candidate is already out of traffic)."""
    return Automation(
        name=ON_CANARY_ABORTED,
        description=(
            f"When the online verdict aborts a canary or shadow run ({CANARY_ABORTED_EVENT}), "
            "notify. Managed by `phi3ops automations apply`."
        ),
        tags=TAGS,
        trigger=_on_each(CANARY_ABORTED_EVENT),
        actions=[
            SendNotification(
                block_document_id=notification_block_id,
                subject=f"phi3ops: canary of {MODEL} aborted",
                body=(
                    f"The {{{{ event.payload.mode }}}} run of {MODEL} against champion "
                    "v{{ event.payload.champion_version }} was aborted at {{ event.occurred }}:\n"
                    "{{ event.payload.reasons | join('\n') }}\n\n"
                    "The traffic plan is cleared: @champion answers every request again. The "
                    "verdict's MLflow run: {{ event.payload.mlflow_run_id }}. Register a fixed "
                    f"version, then `phi3ops canary start --model-name {MODEL_NAME}`."
                ),
            )
        ],
    )


def on_canary_promoted(notification_block_id: UUID) -> Automation:
    """``phi3ops.canary.promoted`` -> notify; the promotion's own ``phi3ops.model.promoted``
    schedules the monitor.
    """
    return Automation(
        name=ON_CANARY_PROMOTED,
        description=(
            f"When the online verdict promotes a candidate ({CANARY_PROMOTED_EVENT}), notify; "
            f"its {PROMOTED_EVENT} schedules the monitor. Managed by `phi3ops automations apply`."
        ),
        tags=TAGS,
        trigger=_on_each(CANARY_PROMOTED_EVENT),
        actions=[
            SendNotification(
                block_document_id=notification_block_id,
                subject=f"phi3ops: {MODEL} promoted on live traffic",
                body=(
                    f"{MODEL} was no worse than champion v{{{{ event.payload.champion_version }}}} "
                    "on live traffic ({{ event.payload.mode }}) and passed the promotion gates "
                    "at {{ event.occurred }}: it is @champion now, the traffic plan is cleared.\n"
                    "{{ event.payload.reasons | join('\n') }}\n\n"
                    "The monitor of the new champion runs one window later "
                    f"({MONITOR_AFTER_PROMOTION})."
                ),
            )
        ],
    )


def build_automations(
    *,
    monitor_deployment_id: UUID,
    notification_block_id: UUID,
    rollback_deployment_id: UUID | None = None,
    monitor_window_minutes: int | None = None,
) -> list[Automation]:
    """Every phi3ops automation, pointing at the given deployments and block.

    Args:
        monitor_deployment_id: The ``monitor`` deployment.
        notification_block_id: The block that monitoring failures, regressions and canary
            verdicts are notified through.
        rollback_deployment_id: The ``rollback`` deployment, to run on monitoring failures;
            None leaves rollback to a person.
        monitor_window_minutes: How long after a promotion the monitor runs, and the window
            it reads; default ``PHI3OPS_MONITOR_WINDOW_MINUTES``.
    """
    if monitor_window_minutes is None:
        monitor_window_minutes = get_settings().monitor_window_minutes
    return [
        monitor_after_promotion(monitor_deployment_id, window_minutes=monitor_window_minutes),
        on_monitoring_failed(notification_block_id, rollback_deployment_id=rollback_deployment_id),
        on_regression(notification_block_id),
        on_canary_aborted(notification_block_id),
        on_canary_promoted(notification_block_id),
    ]


@dataclass(frozen=True)
class AppliedAutomation:
    """One automation as `apply_automations` left it on the server."""

    name: str
    id: UUID
    action: Literal["created", "updated"]


def apply_automations(
    *, rollback_on_failure: bool | None = None, notification_block: str | None = None
) -> list[AppliedAutomation]:
    """Create or update (by name) every phi3ops automation on the Prefect API.

    Args:
        rollback_on_failure: Also run the rollback deployment when monitoring fails; default
            ``PHI3OPS_MONITOR_ROLLBACK_ON_FAILURE``. When off, an existing automation loses
            its rollback action.
        notification_block: Name of the notification block; default
            ``PHI3OPS_NOTIFICATION_BLOCK``.

    Returns:
        What happened to each automation.

    Raises:
        OrchestrationError: No Prefect server is configured or reachable, or a deployment or
            the notification block does not exist (the message says how to create it).
    """
    settings = get_settings()
    if rollback_on_failure is None:
        rollback_on_failure = settings.monitor_rollback_on_failure
    block_name = notification_block or settings.notification_block

    with server_client() as client:
        monitor_id = _deployment_id(client, MONITOR_DEPLOYMENT)
        rollback_id = _deployment_id(client, ROLLBACK_DEPLOYMENT) if rollback_on_failure else None
        block_id = _notification_block_id(client, block_name)
        automations = build_automations(
            monitor_deployment_id=monitor_id,
            notification_block_id=block_id,
            rollback_deployment_id=rollback_id,
        )
        return [_upsert(client, automation) for automation in automations]


def create_webhook_block(url: str, *, name: str | None = None) -> UUID:
    """Save (or overwrite) a custom-webhook notification block that POSTs JSON
    ``{"subject", "body", "source"}`` to ``url``; named ``PHI3OPS_NOTIFICATION_BLOCK`` by default.

    Returns:
        The block document's id.
    """
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(
        name="phi3ops",
        url=url,
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "{{name}}"},
    )
    with server_client():  # the same clear error when no server is configured or reachable
        return block.save(name or get_settings().notification_block, overwrite=True)


# --- the Prefect API ----------------------------------------------------------------------


@contextmanager
def server_client() -> Iterator[SyncPrefectClient]:
    """A client of the configured Prefect server; never Prefect's temporary one, which would
    forget the automations as soon as this process ends.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise OrchestrationError(
            "PREFECT_API_URL is not set: automations live on a Prefect server. Start one "
            "(`prefect server start`) and point at it, e.g. `prefect config set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise OrchestrationError(
                f"Cannot reach the Prefect API at {url} ({problem}): start the server "
                "(`prefect server start`) or fix PREFECT_API_URL."
            ) from problem
        yield client


def _deployment_id(client: SyncPrefectClient, name: str) -> UUID:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name).id
    except ObjectNotFound as exc:
        raise OrchestrationError(
            f"Deployment {name!r} does not exist on {client.api_url}: create the work pool and "
            "the deployments first (`prefect work-pool create phi3ops-process --type process`, "
            "then `prefect deploy --all` from the repository root)."
        ) from exc


def _notification_block_id(client: SyncPrefectClient, name: str) -> UUID:
    from prefect.client.schemas.objects import BlockDocument

    response = client.request(
        "POST",
        "/block_documents/filter",
        json={
            "block_documents": {"name": {"any_": [name]}, "is_anonymous": {"eq_": False}},
            "include_secrets": False,
        },
    )
    blocks = BlockDocument.model_validate_list(response.json())
    fix = (
        f"create it with `phi3ops automations apply --create-webhook-block URL`, or in the UI "
        f"(Blocks > add a Slack Webhook, Email, Custom Webhook... block named {name!r}), or "
        "name another one in PHI3OPS_NOTIFICATION_BLOCK."
    )
    if not blocks:
        raise OrchestrationError(
            f"Notification block {name!r} does not exist on {client.api_url}: {fix}"
        )
    notifiers = [
        b for b in blocks if b.block_schema is None or "notify" in b.block_schema.capabilities
    ]
    if not notifiers:
        kinds = ", ".join(sorted({b.block_type_name or "?" for b in blocks}))
        raise OrchestrationError(f"Block {name!r} ({kinds}) cannot send notifications: {fix}")
    if len(notifiers) > 1:
        kinds = ", ".join(sorted(b.block_type_name or "?" for b in notifiers))
        raise OrchestrationError(
            f"Several notification blocks are named {name!r} ({kinds}): rename or delete all but "
            "one, or name another one in PHI3OPS_NOTIFICATION_BLOCK."
        )
    return notifiers[0].id


def _upsert(client: SyncPrefectClient, automation: Automation) -> AppliedAutomation:
    """Update the automation of this name (removing duplicates), or create it."""
    from prefect.events.schemas.automations import AutomationCore

    # owner_resource is refused by updates; unset fields are left out of the request body.
    core = AutomationCore(**automation.model_dump(exclude={"id", "owner_resource"}))
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        return AppliedAutomation(automation.name, client.create_automation(core), "created")
    keep, *duplicates = existing
    client.update_automation(keep.id, core)
    for duplicate in duplicates:
        client.delete_automation(duplicate.id)
    return AppliedAutomation(automation.name, keep.id, "updated")
