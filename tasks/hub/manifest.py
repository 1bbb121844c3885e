"""A snapshot's layout on disk, and its manifest: the record that it is complete and verified.

Layout under the target root::

    <root>/<org>--<name>/<commit sha>/...files...
    <root>/<org>--<name>/<commit sha>/phi3ops-manifest.json
    <root>/.staging/<org>--<name>--<sha12>-<random>/   (one fetch's downloads, always removed)

Each fetch downloads into a staging folder of its own, so two fetches of one commit never share
in-flight files; verified files are moved into the snapshot with an atomic rename each. The
manifest is written last, through a temporary file beside the snapshot folder and a rename: a
snapshot folder with a manifest is complete, one without it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from phi3ops.sources import Variant

MANIFEST_NAME = "phi3ops-manifest.json"


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


def manifest_digest(repo_id: str, commit_sha: str, entries: Iterable[ManifestEntry]) -> str:
    """A sha256 over the repo, the commit and every (path, size, sha256), in path order."""
    payload = {
        "repo_id": repo_id,
        "commit_sha": commit_sha,
        "files": [e.model_dump() for e in sorted(entries, key=lambda e: e.path)],
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def repo_folder(repo_id: str) -> str:
    """The folder name of a repository's snapshots: ``org/name`` becomes ``org--name``."""
    return repo_id.replace("/", "--")


def new_staging_dir(root: Path, repo_id: str, commit_sha: str) -> Path:
    """A fresh, empty staging folder for one fetch: ``<root>/.staging/<org>--<name>--<sha12>-*``.

    The caller removes it when the fetch ends, however it ends.
    """
    parent = root / ".staging"
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{repo_folder(repo_id)}--{commit_sha[:12]}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def manifest_path(snapshot_dir: Path) -> Path:
    """Where the manifest of the snapshot in ``snapshot_dir`` is (or will be) written."""
    return snapshot_dir / MANIFEST_NAME


def read_manifest(snapshot_dir: Path) -> dict[str, Any] | None:
    """The manifest of a snapshot folder as written, or None when it is missing or unreadable.

    Args:
        snapshot_dir: ``<root>/<org>--<name>/<commit sha>``.

    Returns:
        The parsed manifest, or None (the snapshot is then incomplete).
    """
    try:
        return json.loads(manifest_path(snapshot_dir).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(
    snapshot_dir: Path,
    repo_id: str,
    revision: str,
    commit_sha: str,
    variant: Variant,
    digest: str,
    entries: list[ManifestEntry],
) -> None:
    """Writes a snapshot's manifest atomically (a temporary file, then a rename).

    Args:
        snapshot_dir: The snapshot folder; created when missing.
        repo_id: Hub repository, ``org/name``.
        revision: The revision asked for (a branch, tag or sha).
        commit_sha: The commit ``revision`` resolved to.
        variant: The variant whose files the snapshot holds.
        digest: `manifest_digest` of the entries.
        entries: Every verified file, in path order.
    """
    manifest = {
        "repo_id": repo_id,
        "revision": revision,
        "commit_sha": commit_sha,
        "variant": variant.value,
        "manifest_digest": digest,
        "files": [e.model_dump() for e in entries],
    }
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    # A temporary file of this write's own (another fetch of the commit may write at the same
    # time), beside the snapshot folder rather than in it: the folder holds model files only.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{snapshot_dir.name}.", suffix=".tmp", dir=snapshot_dir.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, manifest_path(snapshot_dir))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def snapshot_result(
    snapshot_dir: Path,
    repo_id: str,
    revision: str,
    commit_sha: str,
    variant: Variant,
    digest: str,
    entries: list[ManifestEntry],
    downloaded: int,
) -> FetchResult:
    """The `FetchResult` of a complete snapshot.

    Args:
        snapshot_dir: The snapshot folder.
        repo_id: Hub repository, ``org/name``.
        revision: The revision asked for.
        commit_sha: The commit it resolved to.
        variant: The variant fetched; its subfolder, if any, is the model folder.
        digest: The manifest digest.
        entries: Every file of the snapshot.
        downloaded: Bytes downloaded by this fetch (0 when everything was already there).

    Returns:
        The result later stages log lineage from.
    """
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
