"""Fetching a snapshot end to end, the fail-fast pre-check, and the retrying Prefect task."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3ops.errors import IntegrityError
from phi3ops.settings import get_settings
from phi3ops.sources import Variant
from tasks.hub.connection import endpoint as hub_endpoint
from tasks.hub.connection import resolve_hf_token
from tasks.hub.download import check_disk_space, download_verified
from tasks.hub.errors import is_transient, raise_translated
from tasks.hub.manifest import (
    FetchResult,
    ManifestEntry,
    manifest_digest,
    read_manifest_entries,
    repo_folder,
    snapshot_result,
    write_manifest,
)
from tasks.hub.resolve import list_files, resolve_revision
from tasks.hub.verify import RemoteFile, verified_local

logger = logging.getLogger(__name__)


def fetch_snapshot(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_root: Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> FetchResult:
    """Download one commit of a hub repository, verify every file, and write its manifest.

    Args:
        repo_id: Hub repository, ``org/name``.
        revision: Branch, tag or commit sha; resolved to a commit sha before anything downloads.
        variant: Which files to fetch (see `Variant.allow_patterns`).
        target_root: Root folder for snapshots; defaults to ``Settings.snapshots_dir``.
        token: Hugging Face token for gated or private repositories. Never logged.
        endpoint: Hub URL; defaults to ``PHI3OPS_HF_ENDPOINT``, then ``HF_ENDPOINT``, then the hub.

    Returns:
        The verified snapshot.

    Raises:
        InvalidInputError: ``repo_id`` or ``revision`` is malformed.
        RepoNotFoundError, RevisionNotFoundError, RemoteFileNotFoundError: nothing to fetch there.
        HubAccessDeniedError: the repository is gated or the token is wrong.
        HubUnreachableError: offline and no snapshot of that revision is cached.
        TransientHubError: 429, 5xx or a dropped connection; worth retrying.
        IntegrityError: a downloaded file does not match its checksum (it was deleted).
        InsufficientDiskSpaceError: the download would not fit.
    """
    variant = Variant(variant)
    root = Path(target_root) if target_root is not None else get_settings().snapshots_dir
    endpoint = hub_endpoint(endpoint)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token or False)
    resolved = resolve_revision(api, repo_id, revision, variant, root, token=token)
    if isinstance(resolved, FetchResult):
        return resolved  # offline, served from the local cache
    commit_sha = resolved
    repo_root = root / repo_folder(repo_id)

    try:
        remote_files = list_files(api, repo_id, commit_sha, variant)
    except Exception as exc:
        raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)

    snapshot_dir = repo_root / commit_sha
    staging_dir = root / ".staging" / repo_folder(repo_id) / commit_sha
    known = read_manifest_entries(snapshot_dir)
    entries: list[ManifestEntry] = []
    to_download: list[RemoteFile] = []
    for remote in remote_files:
        entry = verified_local(snapshot_dir / remote.path, remote, known.get(remote.path))
        if entry is None:
            to_download.append(remote)
        else:
            entries.append(entry)

    if not to_download:
        logger.info("Snapshot %s@%s already complete at %s", repo_id, commit_sha, snapshot_dir)
    else:
        headroom = get_settings().disk_headroom_bytes
        check_disk_space(root, sum(f.size for f in to_download), headroom)
        for remote in to_download:
            try:
                entries.append(
                    download_verified(
                        remote,
                        repo_id=repo_id,
                        commit_sha=commit_sha,
                        staging_dir=staging_dir,
                        snapshot_dir=snapshot_dir,
                        endpoint=endpoint,
                        token=token,
                    )
                )
            except IntegrityError:
                raise
            except Exception as exc:
                raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)
        shutil.rmtree(staging_dir, ignore_errors=True)

    entries.sort(key=lambda e: e.path)
    digest = manifest_digest(repo_id, commit_sha, entries)
    write_manifest(snapshot_dir, repo_id, revision, commit_sha, variant, digest, entries)
    downloaded = sum(f.size for f in to_download)
    logger.info(
        "Fetched %s@%s (%s): %d files, %d bytes downloaded, manifest %s",
        repo_id,
        commit_sha[:12],
        variant,
        len(entries),
        downloaded,
        digest[:12],
    )
    return snapshot_result(
        snapshot_dir, repo_id, revision, commit_sha, variant, digest, entries, downloaded
    )


def check_fetchable(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_root: Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> None:
    """Fail fast, before any orchestration starts, when a fetch cannot possibly succeed.

    One metadata request (or none when offline): the revision must resolve on the hub, or a
    snapshot of it must be cached.

    Args:
        repo_id: Hub repository, ``org/name``.
        revision: Branch, tag or commit sha.
        variant: Which files would be fetched.
        target_root: Root folder for snapshots; defaults to ``Settings.snapshots_dir``.
        token: Hugging Face token for gated or private repositories. Never logged.
        endpoint: Hub URL; defaults as in `fetch_snapshot`.

    Raises:
        Phi3OpsError: The same errors as `fetch_snapshot`.
    """
    from huggingface_hub import HfApi

    root = Path(target_root) if target_root is not None else get_settings().snapshots_dir
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token or False)
    resolve_revision(api, repo_id, revision, Variant(variant), root, token=token)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


@task(
    name="fetch-snapshot",
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    retry_condition_fn=_retry_if_transient,
    cache_policy=NO_CACHE,
)
def fetch_snapshot_task(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_root: Path | None = None,
) -> FetchResult:
    """Prefect wrapper of `fetch_snapshot`, retried on transient hub errors only.

    The token is resolved here, never passed in, so it cannot end up among stored flow or task
    parameters.

    Args:
        repo_id: Hub repository, ``org/name``.
        revision: Branch, tag or commit sha.
        variant: Which files to fetch.
        target_root: Root folder for snapshots; defaults to ``Settings.snapshots_dir``.

    Returns:
        The verified snapshot.
    """
    return fetch_snapshot(
        repo_id,
        revision=revision,
        variant=variant,
        target_root=target_root,
        token=resolve_hf_token(),
    )
