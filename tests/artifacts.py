"""Reading Prefect artifacts back through the Prefect API, as a user of the UI would see them."""

from __future__ import annotations


def latest_artifact_data(key: str) -> str:
    """The data of the newest Prefect artifact with this key (markdown, or a table as JSON)."""
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
    return str(found[0].data)
