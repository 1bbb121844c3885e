"""Reading Prefect artifacts and run logs back through the Prefect API, as a user of the UI
would see them.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID


def latest_artifact(key: str) -> Any:
    """The newest Prefect artifact with this key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    assert found, f"no Prefect artifact {key!r}"
    return found[0]


def latest_artifact_data(key: str) -> str:
    """The data of the newest Prefect artifact with this key (markdown, or a table as JSON)."""
    return str(latest_artifact(key).data)


def run_logs(flow_run_id: UUID) -> list[str]:
    """A flow run's log lines in the Prefect API, as ``<logger> <LEVEL> <message>``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the handler sends in batches, in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [f"{log.name} {logging.getLevelName(log.level)} {log.message}" for log in logs]
