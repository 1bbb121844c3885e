"""Prefect events about model versions (automations react to them), and who triggered a change.

Event names live in `phi3ops.names`; every flow that announces something emits through here.
"""

from __future__ import annotations

import getpass
import socket
from typing import Any
from uuid import UUID

from phi3ops.names import MODEL_NAME_TAG, MODEL_VERSION_TAG, model_resource_id


def emit(
    event: str,
    *,
    model_name: str,
    version: str,
    payload: dict[str, Any],
    event_id: UUID | None = None,
) -> None:
    """A Prefect event about one model version.

    Args:
        event: One of the ``*_EVENT`` names in `phi3ops.names`.
        model_name: Registered model.
        version: The version the event is about.
        payload: Details (reasons, aliases, run ids); the name and version are added.
        event_id: A fixed id, so that announcing the same change again (a re-run finishing a
            crashed one) is the same event, which Prefect's triggers see once; random if None.
    """
    from prefect.events import emit_event

    emit_event(
        event=event,
        resource={
            "prefect.resource.id": model_resource_id(model_name, version),
            "prefect.resource.name": f"{model_name} v{version}",
            MODEL_NAME_TAG: model_name,
            MODEL_VERSION_TAG: version,
        },
        payload={"model_name": model_name, "version": version, **payload},
        id=event_id,
    )


def prefect_is_listening() -> bool:
    """Whether an event has somewhere to go: inside a flow or task run, or with
    ``PREFECT_API_URL`` set. A plain call outside Prefect would start a temporary Prefect
    server just to drop the event, so callers that also run outside Prefect check this first.
    """
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_API_URL

    return bool(FlowRunContext.get() or TaskRunContext.get() or PREFECT_API_URL.value())


def default_trigger() -> str:
    """Who or what started this: the Prefect deployment / flow run if any, else user@host."""
    try:
        from prefect.runtime import deployment, flow_run

        if flow_run.id:
            source = f"deployment {deployment.name}" if deployment.name else "flow run"
            return f"{source} {flow_run.name} ({flow_run.id})"
    except Exception:  # outside Prefect the runtime answers None; never fail on provenance
        pass
    return f"{getpass.getuser()}@{socket.gethostname()}"
