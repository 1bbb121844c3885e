"""What to fetch: the revision pinned to a commit sha, and the files of that commit to download.

The requested revision is resolved to a commit sha first and exactly that sha is downloaded, so
a branch that moves during the download cannot mix two commits. Offline (``HF_HUB_OFFLINE``, or
the hub unreachable), the newest complete cached snapshot of the revision stands in.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path
from typing import Any

from phi3ops.errors import (
    HubUnreachableError,
    InvalidInputError,
    RemoteFileNotFoundError,
    TransientHubError,
)
from phi3ops.sources import Variant
from tasks.hub.connection import offline_mode
from tasks.hub.errors import is_unreachable, raise_translated
from tasks.hub.manifest import (
    FetchResult,
    ManifestEntry,
    manifest_path,
    read_manifest,
    repo_folder,
    snapshot_result,
)
from tasks.hub.trust import skipped, snapshot_problems
from tasks.hub.verify import RemoteFile

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_inputs(repo_id: str, revision: str) -> None:
    """Rejects a malformed repository id or an empty revision before any request.

    Raises:
        InvalidInputError: ``repo_id`` is not ``org/name``, or ``revision`` is blank.
    """
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise InvalidInputError(
            f"repo_id {repo_id!r} is not a hub repository id: use 'org/name', "
            f"e.g. 'microsoft/Phi-3-mini-4k-instruct-onnx'."
        )
    if not isinstance(revision, str) or not revision.strip():
        raise InvalidInputError(
            "revision is empty: pass a branch ('main'), a tag or a 40-character commit sha."
        )


def resolve_revision(
    api: Any, repo_id: str, revision: str, variant: Variant, root: Path, *, token: str | None
) -> str | FetchResult:
    """The commit sha ``revision`` points at on the hub; offline, the cached snapshot of it.

    Args:
        api: A ``huggingface_hub.HfApi``.
        repo_id: Hub repository, ``org/name``.
        revision: Branch, tag or commit sha.
        variant: The variant wanted (a cached snapshot must be of it).
        root: The snapshots root.
        token: The token ``api`` uses, if any (for error messages only).

    Returns:
        The commit sha, or, offline, the complete cached snapshot to use instead.

    Raises:
        InvalidInputError: Malformed inputs.
        HubUnreachableError: Offline and nothing usable is cached.
        Phi3OpsError: The hub's error, translated (see `tasks.hub.errors`).
    """
    check_inputs(repo_id, revision)
    repo_root = root / repo_folder(repo_id)
    if offline_mode():
        return cached_snapshot(
            repo_root, repo_id, revision, variant, reason="HF_HUB_OFFLINE is set", cause=None
        )
    try:
        commit_sha = api.model_info(repo_id, revision=revision).sha
    except Exception as exc:
        if is_unreachable(exc):
            return cached_snapshot(
                repo_root, repo_id, revision, variant, reason="the hub is unreachable", cause=exc
            )
        raise_translated(exc, repo_id=repo_id, revision=revision, token=token)
    if not commit_sha:
        raise TransientHubError(
            f"The hub returned no commit sha for {repo_id}@{revision}; try again later."
        )
    return commit_sha


def list_files(api: Any, repo_id: str, commit_sha: str, variant: Variant) -> list[RemoteFile]:
    """The files of a commit that the variant wants, sorted by path.

    Args:
        api: A ``huggingface_hub.HfApi``.
        repo_id: Hub repository, ``org/name``.
        commit_sha: The pinned commit.
        variant: Its ``allow_patterns`` choose the files; Python files among them are left
            out (see `tasks.hub.trust`).

    Returns:
        The files with their sizes and checksums.

    Raises:
        RemoteFileNotFoundError: The variant matches nothing but docs and licenses there.
    """
    from huggingface_hub.hf_api import RepoFile

    files = [
        RemoteFile(
            path=item.path,
            size=item.size,
            blob_id=item.blob_id,
            sha256=item.lfs.sha256 if item.lfs else None,
        )
        for item in api.list_repo_tree(repo_id, revision=commit_sha, recursive=True)
        if isinstance(item, RepoFile) and _wanted(item.path, variant)
    ]
    left_out = [f.path for f in files if skipped(f.path)]
    if left_out:
        logger.warning(
            "Not fetching %s from %s@%s: Python code, which phi3ops never runs",
            ", ".join(left_out),
            repo_id,
            commit_sha[:12],
        )
        files = [f for f in files if not skipped(f.path)]
    if not any(not f.path.endswith((".md", "LICENSE")) for f in files):
        raise RemoteFileNotFoundError(
            f"{repo_id}@{commit_sha[:12]} has no files for variant {variant.value!r} "
            f"(patterns {', '.join(variant.allow_patterns)}). Check the variant: the ONNX int4 "
            f"files live in microsoft/Phi-3-mini-4k-instruct-onnx, the PyTorch weights in "
            f"microsoft/Phi-3-mini-4k-instruct."
        )
    return sorted(files, key=lambda f: f.path)


def _wanted(path: str, variant: Variant) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in variant.allow_patterns)


def cached_snapshot(
    repo_root: Path,
    repo_id: str,
    revision: str,
    variant: Variant,
    *,
    reason: str,
    cause: BaseException | None,
) -> FetchResult:
    """The newest complete cached snapshot of ``revision``, for working offline.

    Args:
        repo_root: ``<root>/<org>--<name>``.
        repo_id: Hub repository, ``org/name``.
        revision: A commit sha, or the revision a snapshot was fetched as.
        variant: The variant the snapshot must hold.
        reason: Why the hub is not asked (told in messages).
        cause: The error that made the hub unreachable, if any (chained).

    Returns:
        The snapshot, with nothing downloaded.

    Raises:
        HubUnreachableError: No such snapshot is cached, or the newest one is incomplete.
    """
    candidates = []
    if repo_root.is_dir():
        for snapshot_dir in repo_root.iterdir():
            manifest = read_manifest(snapshot_dir)
            if not manifest or manifest.get("variant") != variant.value:
                continue
            if revision in (manifest.get("commit_sha"), manifest.get("revision")):
                candidates.append((manifest_path(snapshot_dir).stat().st_mtime, manifest))
    if not candidates:
        raise HubUnreachableError(
            f"Cannot fetch {repo_id}@{revision} ({variant.value}): {reason} and no snapshot of "
            f"it is cached under {repo_root}. Connect to the hub (or set HF_ENDPOINT to a "
            f"reachable mirror) and unset HF_HUB_OFFLINE, or run `make demo` to try the "
            f"pipeline offline on a tiny Phi-3."
        ) from cause
    _, manifest = max(candidates, key=lambda c: c[0])
    snapshot_dir = repo_root / manifest["commit_sha"]
    entries = [ManifestEntry(**f) for f in manifest["files"]]
    # Re-hashed, not trusted: the manifest tells what was verified then, not what is there now.
    problems = snapshot_problems(snapshot_dir, entries)
    if problems:
        raise HubUnreachableError(
            f"The cached snapshot {snapshot_dir} is damaged ({'; '.join(problems)}) and "
            f"{reason}. Fetch again with the hub reachable."
        ) from cause
    logger.warning("%s: using cached snapshot %s@%s", reason, repo_id, manifest["commit_sha"][:12])
    return snapshot_result(
        snapshot_dir,
        repo_id,
        revision,
        manifest["commit_sha"],
        variant,
        manifest["manifest_digest"],
        entries,
        0,
    )
