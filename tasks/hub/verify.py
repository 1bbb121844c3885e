"""Checking a file against the checksum the hub reports for it.

The hub reports a sha256 for LFS files and the git blob id (sha1 over a ``blob <size>``
header, a NUL byte, then the bytes) for the others; a file is hashed both ways in one pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.hub.manifest import ManifestEntry

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """One file of a hub commit, as the hub lists it.

    Attributes:
        path: Path in the repository.
        size: Size in bytes.
        blob_id: The git blob id.
        sha256: The LFS sha256; None for files not stored in LFS.
    """

    path: str
    size: int
    blob_id: str
    sha256: str | None  # only LFS files carry one


def hash_file(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha256 = hashlib.sha256()
    blob = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha256.update(chunk)
            blob.update(chunk)
    return sha256.hexdigest(), blob.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file (what a manifest records)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def matches(remote: RemoteFile, sha256: str, blob_id: str) -> bool:
    """Whether a file's hashes match the remote's checksum (its sha256 if LFS, else its blob id)."""
    return sha256 == remote.sha256 if remote.sha256 else blob_id == remote.blob_id


def verified_local(path: Path, remote: RemoteFile) -> ManifestEntry | None:
    """The manifest entry of a local file that matches ``remote``, else None.

    The file is always re-hashed: a manifest says what was verified when it was written, not
    what is on disk now (a cached file may have been damaged or altered since).

    Args:
        path: Where the file would be in the snapshot folder.
        remote: What the hub lists for it.

    Returns:
        The entry, or None when the file is missing or differs and must be downloaded.
    """
    if not path.is_file() or path.stat().st_size != remote.size:
        return None
    sha256, blob_id = hash_file(path)
    if not matches(remote, sha256, blob_id):
        return None
    return ManifestEntry(path=remote.path, size=remote.size, sha256=sha256)
