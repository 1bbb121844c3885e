"""Fetch a pinned, verified snapshot of a hub repository.

The fetch resolves the requested revision to a commit sha first and downloads exactly that sha,
so a branch that moves during the download cannot mix two commits. Every file is checked against
the checksum the hub reports (sha256 for LFS files, the git blob id for the others) in a staging
folder, and only verified files are moved into the snapshot folder. The manifest is written last:
a snapshot folder with a manifest is complete, one without it is not.

Layout under the target root::

    <root>/<org>--<name>/<commit sha>/...files...
    <root>/<org>--<name>/<commit sha>/phi3ops-manifest.json
    <root>/.staging/<org>--<name>/<commit sha>/   (in-flight downloads, removed on success)
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3ops.errors import (
    HubAccessDeniedError,
    HubUnreachableError,
    InsufficientDiskSpaceError,
    IntegrityError,
    InvalidInputError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TransientHubError,
)
from phi3ops.settings import get_settings
from phi3ops.sources import Variant

logger = logging.getLogger(__name__)

MANIFEST_NAME = "phi3ops-manifest.json"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 8 * 1024 * 1024


class ManifestEntry(BaseModel):
    """One verified file of a snapshot."""

    path: str
    size: int
    sha256: str


class FetchResult(BaseModel):
    """A complete, verified snapshot on local disk: what later stages need to log lineage."""

    local_dir: Path
    model_dir: Path
    repo_id: str
    revision: str
    commit_sha: str
    variant: Variant
    manifest_digest: str
    total_bytes: int
    downloaded_bytes: int
    file_count: int


@dataclass(frozen=True)
class _RemoteFile:
    path: str
    size: int
    blob_id: str
    sha256: str | None  # only LFS files carry one


# --- public API ---------------------------------------------------------------------------


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
    endpoint = _endpoint(endpoint)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token or False)
    resolved = _resolve(api, repo_id, revision, variant, root, token=token)
    if isinstance(resolved, FetchResult):
        return resolved  # offline, served from the local cache
    commit_sha = resolved
    repo_root = root / _repo_folder(repo_id)

    try:
        remote_files = _list_files(api, repo_id, commit_sha, variant)
    except Exception as exc:
        _raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)

    snapshot_dir = repo_root / commit_sha
    staging_dir = root / ".staging" / _repo_folder(repo_id) / commit_sha
    known = _read_manifest_entries(snapshot_dir)
    entries: list[ManifestEntry] = []
    to_download: list[_RemoteFile] = []
    for remote in remote_files:
        entry = _verified_local(snapshot_dir / remote.path, remote, known.get(remote.path))
        if entry is None:
            to_download.append(remote)
        else:
            entries.append(entry)

    if not to_download:
        logger.info("Snapshot %s@%s already complete at %s", repo_id, commit_sha, snapshot_dir)
    else:
        headroom = get_settings().disk_headroom_bytes
        _check_disk_space(root, sum(f.size for f in to_download), headroom)
        for remote in to_download:
            try:
                entries.append(
                    _download_verified(
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
                _raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)
        shutil.rmtree(staging_dir, ignore_errors=True)

    entries.sort(key=lambda e: e.path)
    digest = manifest_digest(repo_id, commit_sha, entries)
    _write_manifest(snapshot_dir, repo_id, revision, commit_sha, variant, digest, entries)
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
    return _result(
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
    snapshot of it must be cached. Raises the same errors as `fetch_snapshot`.
    """
    from huggingface_hub import HfApi

    root = Path(target_root) if target_root is not None else get_settings().snapshots_dir
    api = HfApi(endpoint=_endpoint(endpoint), token=token or False)
    _resolve(api, repo_id, revision, Variant(variant), root, token=token)


def manifest_digest(repo_id: str, commit_sha: str, entries: Iterable[ManifestEntry]) -> str:
    """A sha256 over the repo, the commit and every (path, size, sha256), in path order."""
    payload = {
        "repo_id": repo_id,
        "commit_sha": commit_sha,
        "files": [e.model_dump() for e in sorted(entries, key=lambda e: e.path)],
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_hf_token(secret_block: str | None = None) -> str | None:
    """The Hugging Face token: ``HF_TOKEN`` first, else the named Prefect Secret block.

    Args:
        secret_block: Name of a Prefect ``Secret`` block; defaults to
            ``Settings.hf_token_secret_block``.

    Returns:
        The token, or None when neither source has one (public repositories need none).
    """
    token = os.environ.get("HF_TOKEN") or None
    if token:
        return token
    block_name = secret_block or get_settings().hf_token_secret_block
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(block_name)
    except ValueError as exc:
        raise InvalidInputError(
            f"Prefect Secret block {block_name!r} (PHI3OPS_HF_TOKEN_SECRET_BLOCK) does not exist. "
            f"Create it with `prefect block create secret` or unset the setting and use HF_TOKEN."
        ) from exc
    return secret.get() or None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: rate limits, server errors and dropped connections."""
    return isinstance(exc, TransientHubError)


# --- Prefect task ---------------------------------------------------------------------------


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
    """Prefect wrapper of `fetch_snapshot`. The token is resolved here, never passed in, so it
    cannot end up among stored flow or task parameters."""
    return fetch_snapshot(
        repo_id,
        revision=revision,
        variant=variant,
        target_root=target_root,
        token=resolve_hf_token(),
    )


# --- helpers ----------------------------------------------------------------------------------


def _check_inputs(repo_id: str, revision: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise InvalidInputError(
            f"repo_id {repo_id!r} is not a hub repository id: use 'org/name', "
            f"e.g. 'microsoft/Phi-3-mini-4k-instruct-onnx'."
        )
    if not isinstance(revision, str) or not revision.strip():
        raise InvalidInputError(
            "revision is empty: pass a branch ('main'), a tag or a 40-character commit sha."
        )


def _endpoint(explicit: str | None) -> str | None:
    return explicit or get_settings().hf_endpoint or os.environ.get("HF_ENDPOINT") or None


def _repo_folder(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def _resolve(
    api: Any, repo_id: str, revision: str, variant: Variant, root: Path, *, token: str | None
) -> str | FetchResult:
    """The commit sha ``revision`` points at on the hub; offline, the cached snapshot of it."""
    _check_inputs(repo_id, revision)
    repo_root = root / _repo_folder(repo_id)
    if _offline_mode():
        return _cached_or_raise(
            repo_root, repo_id, revision, variant, reason="HF_HUB_OFFLINE is set", cause=None
        )
    try:
        commit_sha = api.model_info(repo_id, revision=revision).sha
    except Exception as exc:
        if _is_unreachable(exc):
            return _cached_or_raise(
                repo_root, repo_id, revision, variant, reason="the hub is unreachable", cause=exc
            )
        _raise_translated(exc, repo_id=repo_id, revision=revision, token=token)
    if not commit_sha:
        raise TransientHubError(
            f"The hub returned no commit sha for {repo_id}@{revision}; try again later."
        )
    return commit_sha


def _offline_mode() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a process that
    # sets it later (tests, notebooks) is honoured too.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.is_offline_mode() or env in {"1", "ON", "YES", "TRUE"}


def _list_files(api: Any, repo_id: str, commit_sha: str, variant: Variant) -> list[_RemoteFile]:
    from huggingface_hub.hf_api import RepoFile

    files = [
        _RemoteFile(
            path=item.path,
            size=item.size,
            blob_id=item.blob_id,
            sha256=item.lfs.sha256 if item.lfs else None,
        )
        for item in api.list_repo_tree(repo_id, revision=commit_sha, recursive=True)
        if isinstance(item, RepoFile) and _wanted(item.path, variant)
    ]
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


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def _matches(remote: _RemoteFile, sha256: str, blob_id: str) -> bool:
    return sha256 == remote.sha256 if remote.sha256 else blob_id == remote.blob_id


def _verified_local(
    path: Path, remote: _RemoteFile, known: ManifestEntry | None
) -> ManifestEntry | None:
    """The manifest entry of a local file that already matches ``remote``, else None."""
    if not path.is_file() or path.stat().st_size != remote.size:
        return None
    # Listed in a manifest we wrote after verifying it: trust it, don't re-hash gigabytes.
    if (
        known is not None
        and known.size == remote.size
        and (remote.sha256 is None or known.sha256 == remote.sha256)
    ):
        return known
    sha256, blob_id = _hash_file(path)
    if not _matches(remote, sha256, blob_id):
        return None
    return ManifestEntry(path=remote.path, size=remote.size, sha256=sha256)


def _download_verified(
    remote: _RemoteFile,
    *,
    repo_id: str,
    commit_sha: str,
    staging_dir: Path,
    snapshot_dir: Path,
    endpoint: str | None,
    token: str | None,
) -> ManifestEntry:
    from huggingface_hub import hf_hub_download

    staged = Path(
        hf_hub_download(
            repo_id,
            remote.path,
            revision=commit_sha,
            local_dir=staging_dir,
            endpoint=endpoint,
            token=token or False,
        )
    )
    sha256, blob_id = _hash_file(staged)
    size = staged.stat().st_size
    if size != remote.size or not _matches(remote, sha256, blob_id):
        staged.unlink(missing_ok=True)
        expected = remote.sha256 or remote.blob_id
        actual = sha256 if remote.sha256 else blob_id
        raise IntegrityError(
            f"{repo_id}@{commit_sha[:12]}:{remote.path} failed verification "
            f"(expected {'sha256' if remote.sha256 else 'git blob'} {expected}, {remote.size} "
            f"bytes; got {actual}, {size} bytes). The bad file was deleted; fetch again. If it "
            f"persists, a proxy or mirror (HF_ENDPOINT) is serving wrong bytes."
        )
    final = snapshot_dir / remote.path
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return ManifestEntry(path=remote.path, size=size, sha256=sha256)


def _check_disk_space(root: Path, needed: int, headroom: int) -> None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + headroom > free:
        raise InsufficientDiskSpaceError(
            f"Fetching needs {_gib(needed)} (+{_gib(headroom)} headroom) but {probe} has only "
            f"{_gib(free)} free. Free some space, or point PHI3OPS_DATA_DIR at a larger disk."
        )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _manifest_path(snapshot_dir: Path) -> Path:
    return snapshot_dir / MANIFEST_NAME


def _read_manifest(snapshot_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_manifest_path(snapshot_dir).read_text())
    except (OSError, ValueError):
        return None


def _read_manifest_entries(snapshot_dir: Path) -> dict[str, ManifestEntry]:
    manifest = _read_manifest(snapshot_dir) or {}
    return {f["path"]: ManifestEntry(**f) for f in manifest.get("files", [])}


def _write_manifest(
    snapshot_dir: Path,
    repo_id: str,
    revision: str,
    commit_sha: str,
    variant: Variant,
    digest: str,
    entries: list[ManifestEntry],
) -> None:
    manifest = {
        "repo_id": repo_id,
        "revision": revision,
        "commit_sha": commit_sha,
        "variant": variant.value,
        "manifest_digest": digest,
        "files": [e.model_dump() for e in entries],
    }
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    tmp = snapshot_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, _manifest_path(snapshot_dir))


def _result(
    snapshot_dir: Path,
    repo_id: str,
    revision: str,
    commit_sha: str,
    variant: Variant,
    digest: str,
    entries: list[ManifestEntry],
    downloaded: int,
) -> FetchResult:
    return FetchResult(
        local_dir=snapshot_dir,
        model_dir=snapshot_dir / variant.subfolder if variant.subfolder else snapshot_dir,
        repo_id=repo_id,
        revision=revision,
        commit_sha=commit_sha,
        variant=variant,
        manifest_digest=digest,
        total_bytes=sum(e.size for e in entries),
        downloaded_bytes=downloaded,
        file_count=len(entries),
    )


def _cached_or_raise(
    repo_root: Path,
    repo_id: str,
    revision: str,
    variant: Variant,
    *,
    reason: str,
    cause: BaseException | None,
) -> FetchResult:
    """The newest complete cached snapshot of ``revision``, for working offline."""
    candidates = []
    if repo_root.is_dir():
        for snapshot_dir in repo_root.iterdir():
            manifest = _read_manifest(snapshot_dir)
            if not manifest or manifest.get("variant") != variant.value:
                continue
            if revision in (manifest.get("commit_sha"), manifest.get("revision")):
                candidates.append((_manifest_path(snapshot_dir).stat().st_mtime, manifest))
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
    for entry in entries:
        path = snapshot_dir / entry.path
        if not path.is_file() or path.stat().st_size != entry.size:
            raise HubUnreachableError(
                f"The cached snapshot {snapshot_dir} is incomplete ({entry.path} is missing or "
                f"truncated) and {reason}. Fetch again with the hub reachable."
            ) from cause
    logger.warning("%s: using cached snapshot %s@%s", reason, repo_id, manifest["commit_sha"][:12])
    return _result(
        snapshot_dir,
        repo_id,
        revision,
        manifest["commit_sha"],
        variant,
        manifest["manifest_digest"],
        entries,
        0,
    )


def _is_unreachable(exc: BaseException) -> bool:
    """No connection could be opened at all (DNS, refused, no route): the machine is offline."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(exc, OfflineModeIsEnabled | httpx2.ConnectError | httpx2.ConnectTimeout)


def _raise_translated(
    exc: Exception, *, repo_id: str, revision: str, token: str | None
) -> NoReturn:
    """Re-raise a huggingface_hub / transport error as the phi3ops error that names the fix."""
    mapped = _translate(exc, repo_id=repo_id, revision=revision, token=token)
    if mapped is None:
        raise exc
    raise mapped from exc


def _translate(
    exc: Exception, *, repo_id: str, revision: str, token: str | None
) -> Exception | None:
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
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
