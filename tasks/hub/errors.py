"""Mapping huggingface_hub and transport (httpx2) errors to the phi3ops errors that name the fix.

huggingface_hub is imported inside the functions: importing this package stays fast.
"""

from __future__ import annotations

import errno
from typing import NoReturn

from phi3ops.errors import (
    HubAccessDeniedError,
    InsufficientDiskSpaceError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TransientHubError,
)
from tasks.hub.timeouts import timed_out_connecting


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: rate limits, server errors and dropped connections."""
    return isinstance(exc, TransientHubError)


def is_unreachable(exc: BaseException) -> bool:
    """No connection could be opened at all (DNS, refused, no route): the machine is offline."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    connect_errors = OfflineModeIsEnabled | httpx2.ConnectError | httpx2.ConnectTimeout
    return isinstance(exc, connect_errors) or timed_out_connecting(exc)


def raise_translated(exc: Exception, *, repo_id: str, revision: str, token: str | None) -> NoReturn:
    """Re-raise a huggingface_hub / transport error as the phi3ops error that names the fix.

    Args:
        exc: What huggingface_hub (or the transport under it) raised.
        repo_id: The repository being fetched.
        revision: The revision (or commit sha) being fetched.
        token: The token used, if any; only whether there was one is told, never its value.

    Raises:
        Phi3OpsError: The mapped error, chained to ``exc``; ``exc`` itself when nothing maps.
    """
    mapped = translate(exc, repo_id=repo_id, revision=revision, token=token)
    if mapped is None:
        raise exc
    raise mapped from exc


def translate(
    exc: Exception, *, repo_id: str, revision: str, token: str | None
) -> Exception | None:
    """The phi3ops error a huggingface_hub / transport error means, or None when none fits.

    Args:
        exc: What huggingface_hub (or the transport under it) raised.
        repo_id: The repository being fetched.
        revision: The revision (or commit sha) being fetched.
        token: The token used, if any; only whether there was one is told, never its value.

    Returns:
        The error to raise instead (not raised here), or None.
    """
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
    cause = exc.__cause__
    if isinstance(exc, hf.LocalEntryNotFoundError) and isinstance(cause, Exception):
        # hf_hub_download raises this, chained to the real error, when a file's metadata HEAD
        # failed (5xx after its retries, a dropped connection) and nothing is cached.
        mapped = translate(cause, repo_id=repo_id, revision=revision, token=token)
        if mapped is not None:
            return mapped
    if isinstance(exc, hf.GatedRepoError):
        return HubAccessDeniedError(
            f"{repo_id} is gated and the token {'was refused' if token else 'is missing'}. "
            f"Accept the model's terms on its hub page, then set HF_TOKEN (or the Prefect Secret "
            f"block named by PHI3OPS_HF_TOKEN_SECRET_BLOCK) to a token with read access."
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"Revision {revision!r} does not exist in {repo_id}. Use a branch ('main'), a tag or "
            f"a full commit sha from the repository's history."
        )
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return RemoteFileNotFoundError(
            f"A file listed for {where} is missing on the hub ({exc}). The repository changed "
            f"under that revision; fetch a commit sha that has it."
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and token:
            return HubAccessDeniedError(
                f"The hub refused the token for {repo_id} (401). Check HF_TOKEN: it may be "
                f"invalid, expired, or lack read access."
            )
        return RepoNotFoundError(
            f"Repository {repo_id!r} was not found on the hub. Check the spelling (org/name); "
            f"if it is private, set HF_TOKEN to a token that can read it."
        )
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return HubAccessDeniedError(
                f"The hub denied access to {where} ({status}). Set HF_TOKEN to a token with "
                f"read access to {repo_id}."
            )
        if status == 429 or status >= 500 or status == 408:
            return TransientHubError(
                f"The hub answered {status} for {where}; this is usually temporary and is retried."
            )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return InsufficientDiskSpaceError(
            f"The disk filled up while fetching {where}. Free some space or point "
            f"PHI3OPS_DATA_DIR at a larger disk, then fetch again."
        )
    # huggingface_hub raises a bare OSError("Consistency check failed ...") for a truncated body.
    truncated = isinstance(exc, OSError) and "Consistency check failed" in str(exc)
    if isinstance(exc, httpx2.TransportError) or truncated:
        return TransientHubError(
            f"The connection to the hub failed while fetching {where} ({type(exc).__name__}: "
            f"{exc}); this is usually temporary and is retried."
        )
    return None
