"""Fetching a snapshot end to end, the fail-fast pre-check, and the retrying Prefect task."""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from phi3_chat.folder import GENAI_CONFIG
from phi3ops.errors import Phi3OpsError
from phi3ops.settings import get_settings
from phi3ops.sources import Variant
from tasks.hub.connection import endpoint as hub_endpoint
from tasks.hub.connection import resolve_hf_token
from tasks.hub.download import check_disk_space, download_verified
from tasks.hub.errors import is_transient, raise_translated
from tasks.hub.manifest import (
    MANIFEST_NAME,
    FetchResult,
    ManifestEntry,
    manifest_digest,
    new_staging_dir,
    repo_folder,
    snapshot_result,
    write_manifest,
)
from tasks.hub.resolve import list_files, resolve_revision
from tasks.hub.timeouts import install_hub_timeouts
from tasks.hub.trust import refuse_unsafe
from tasks.hub.verify import RemoteFile, verified_local
from tasks.progress import terminal_bar

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


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

    Files already in the snapshot folder are re-hashed and kept when they match the hub's
    checksums; the others are downloaded into a staging folder of this fetch's own, verified,
    checked to be model data (`tasks.hub.trust`), and only then moved into the snapshot, up to
    ``PHI3OPS_HUB_MAX_WORKERS`` files at once. Every request to the hub waits at most
    ``PHI3OPS_HUB_TIMEOUT_S`` (`tasks.hub.timeouts`).

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
        HubTimeoutError: the hub said nothing for ``PHI3OPS_HUB_TIMEOUT_S``; not retried.
        IntegrityError: a downloaded file does not match its checksum (it was deleted).
        UnsafeModelError: a file is not model data (a shared library, an executable...) or a
            ``genai_config.json`` loads code or names a provider other than cpu; nothing of
            this fetch reaches the snapshot folder.
        InsufficientDiskSpaceError: the download would not fit.
    """
    variant = Variant(variant)
    root = Path(target_root) if target_root is not None else get_settings().snapshots_dir
    endpoint = hub_endpoint(endpoint)
    install_hub_timeouts()
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token or False)
    resolved = resolve_revision(api, repo_id, revision, variant, root, token=token)
    if isinstance(resolved, FetchResult):
        return resolved  # offline, served from the local cache
    commit_sha = resolved
    where = f"{repo_id}@{commit_sha[:12]} ({variant.value})"

    try:
        remote_files = list_files(api, repo_id, commit_sha, variant)
    except Exception as exc:
        raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)
    refuse_unsafe({f.path: None for f in remote_files}, where=where)  # before any download

    snapshot_dir = root / repo_folder(repo_id) / commit_sha
    entries: dict[str, ManifestEntry] = {}
    locations: dict[str, Path | None] = {}
    to_download: list[RemoteFile] = []
    for remote in remote_files:
        local = snapshot_dir / remote.path
        entry = verified_local(local, remote)  # re-hashed, never taken from the old manifest
        if entry is None:
            to_download.append(remote)
        else:
            entries[remote.path] = entry
            locations[remote.path] = local

    refuse_unsafe(locations, where=where)  # the genai_config.json already there, if any
    if not to_download:
        logger.info("Snapshot %s@%s already complete at %s", repo_id, commit_sha, snapshot_dir)
    else:
        headroom = get_settings().disk_headroom_bytes
        check_disk_space(root, sum(f.size for f in to_download), headroom)
        for remote, entry in _download_into(
            snapshot_dir,
            to_download,
            staging_dir=new_staging_dir(root, repo_id, commit_sha),
            repo_id=repo_id,
            commit_sha=commit_sha,
            endpoint=endpoint,
            token=token,
            where=where,
        ):
            entries[remote.path] = entry

    _remove_unlisted(snapshot_dir, set(entries))
    ordered = [entries[path] for path in sorted(entries)]
    digest = manifest_digest(repo_id, commit_sha, ordered)
    write_manifest(snapshot_dir, repo_id, revision, commit_sha, variant, digest, ordered)
    downloaded = sum(f.size for f in to_download)
    logger.info(
        "Fetched %s@%s (%s): %d files, %d bytes downloaded, manifest %s",
        repo_id,
        commit_sha[:12],
        variant,
        len(ordered),
        downloaded,
        digest[:12],
    )
    return snapshot_result(
        snapshot_dir, repo_id, revision, commit_sha, variant, digest, ordered, downloaded
    )


def _download_into(
    snapshot_dir: Path,
    to_download: list[RemoteFile],
    *,
    staging_dir: Path,
    repo_id: str,
    commit_sha: str,
    endpoint: str | None,
    token: str | None,
    where: str,
) -> list[tuple[RemoteFile, ManifestEntry]]:
    """Downloads files into this fetch's own staging folder and moves each into the snapshot
    (an atomic rename) once verified and checked to be model data.

    ``genai_config.json`` files go first, one by one, so settings that are refused stop the
    fetch before the weights download. The others then download ``PHI3OPS_HUB_MAX_WORKERS``
    at a time (huggingface_hub's ``hf_hub_download`` on a thread pool, as its own
    ``snapshot_download`` does), each verified, checked and moved on its own as soon as it
    lands. When a file fails, the files not started are dropped, those under way finish, and
    the first failure is raised as it is. A failed fetch keeps the files it verified (the next
    one re-hashes them instead of downloading them again); the staging folder is removed
    however it ends, after every download has stopped.

    Returns:
        Each file with its verified entry: the configs first, then the others by path.
    """
    by_path = sorted(to_download, key=lambda f: f.path)
    configs = [f for f in by_path if f.path.rsplit("/", 1)[-1] == GENAI_CONFIG]
    others = [f for f in by_path if f.path.rsplit("/", 1)[-1] != GENAI_CONFIG]
    total = len(to_download)
    bar = terminal_bar(total=total, desc=f"Fetching {repo_id}@{commit_sha[:12]}", unit="file")
    count = 0

    def one(remote: RemoteFile) -> tuple[RemoteFile, ManifestEntry]:
        try:
            entry, staged = download_verified(
                remote,
                repo_id=repo_id,
                commit_sha=commit_sha,
                staging_dir=staging_dir,
                endpoint=endpoint,
                token=token,
            )
        except Phi3OpsError:
            raise  # already says what failed and how to fix it (integrity, timeout)
        except Exception as exc:
            raise_translated(exc, repo_id=repo_id, revision=commit_sha, token=token)
        refuse_unsafe({remote.path: staged}, where=where)  # a config's settings, now readable
        final = snapshot_dir / remote.path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        return remote, entry

    def landed(result: tuple[RemoteFile, ManifestEntry]) -> None:
        nonlocal count
        count += 1
        bar.update(1)
        logger.info(
            "Fetched %s (%d bytes): file %d of %d", result[0].path, result[1].size, count, total
        )

    done: list[tuple[RemoteFile, ManifestEntry]] = []
    try:
        for remote in configs:
            done.append(one(remote))
            landed(done[-1])
        workers = get_settings().hub_max_workers
        done.extend(_in_parallel(one, others, workers=workers, on_result=landed))
    finally:
        bar.close()
        shutil.rmtree(staging_dir, ignore_errors=True)
    return done


def _in_parallel(
    fn: Callable[[_T], _R],
    items: Sequence[_T],
    *,
    workers: int,
    on_result: Callable[[_R], None],
) -> list[_R]:
    """``[fn(item) for item in items]`` on up to ``workers`` threads, results in item order.

    Each call runs in a copy of the caller's context (so its log lines reach the Prefect run).
    ``on_result`` sees each result in the calling thread, as it comes. On the first failure the
    calls not started are cancelled, the running ones are waited for (their results still go to
    ``on_result``), and that failure is raised.
    """
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(fn(item))
            on_result(results[-1])
        return results
    collected: dict[int, _R] = {}
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="fetch")
    try:
        futures = {
            pool.submit(contextvars.copy_context().run, fn, item): index
            for index, item in enumerate(items)
        }
        for future in as_completed(futures):
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                if failure is None:
                    failure = error
                    for pending in futures:
                        pending.cancel()
                continue
            collected[futures[future]] = future.result()
            on_result(collected[futures[future]])  # kept even after a failure: it was verified
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure
    return [collected[index] for index in range(len(items))]


def _remove_unlisted(snapshot_dir: Path, listed: set[str]) -> None:
    """Deletes what the snapshot folder holds besides the fetched files and the manifest.

    A re-fetch so repairs a snapshot that was added to after its fetch (or that an older
    phi3ops filled with files it no longer takes, such as Python code).
    """
    for path in sorted(snapshot_dir.rglob("*"), reverse=True):
        relative = path.relative_to(snapshot_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(name == relative or name.startswith(f"{relative}/") for name in listed):
                shutil.rmtree(path, ignore_errors=True)
        elif relative not in listed and relative != MANIFEST_NAME:
            logger.warning("Removing %s from %s: not a file of this commit", relative, snapshot_dir)
            path.unlink(missing_ok=True)


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
    install_hub_timeouts()
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
