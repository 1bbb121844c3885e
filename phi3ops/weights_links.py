"""One copy of the weights on disk where it can be: hard links instead of copies.

Three folders hold a served version's weights on one machine: the fetched snapshot, the MLflow
artifacts of its logged model and the server's download. With a local artifact store (a
``file://`` location: the embedded SQLite default's ``mlartifacts``, or a file store) the last
two are made hard links to the first instead of copies, so the bytes are on disk once:

* packaging lets MLflow copy the ONNX folder as usual, then replaces each copied file whose
  bytes equal the (hash-verified) snapshot file of the same name by a hard link to it
  (`share_identical_files`);
* ``phi3ops serve`` builds its folder for a ``models:/`` URI whose artifacts are local files
  from hard links to them (`link_local_model`) instead of copying them.

Where a link cannot be made (another filesystem, ``EXDEV``; a filesystem without hard links) the
copy stays; a remote artifact store (S3, a tracking server's proxied ``mlflow-artifacts:``) is
copied as before: those copies are the floor.

Why sharing an inode is safe: neither MLflow nor phi3ops ever modifies a model file in place.
Fetching writes a file into a staging folder and moves it into the snapshot (a re-fetch
*replaces* a file, leaving the old inode to the links that still name it); MLflow writes new
files and deletes whole folders. A linked file is also made read-only (its write bits cleared:
one inode, so every name sees it), so that an editor or a stray ``open(..., "w")`` fails
instead of silently changing the logged model and the snapshot together. Removal is unaffected:
deleting a name needs write permission on its folder, not on the file.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = [
    "SharedFiles",
    "link_local_model",
    "link_or_copy",
    "local_artifact_dir",
    "same_bytes",
    "share_identical_files",
]

_log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# The errors that mean "no hard link here", after which a copy is the right answer.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
_TMP_SUFFIX = ".phi3ops-link"


@dataclass
class SharedFiles:
    """What a linking pass did: files (and their bytes) now hard links, and files left copies."""

    linked_files: int = 0
    linked_bytes: int = 0
    copied_files: int = 0
    copied_bytes: int = 0


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The local folder of a ``file://`` URI or an absolute path; None for any remote store."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if not parsed.scheme and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (sizes first, then read side by side)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            chunk = fa.read(_CHUNK)
            if chunk != fb.read(_CHUNK):
                return False
            if not chunk:
                return True


def _read_only(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o222:
        path.chmod(stat.S_IMODE(mode) & ~0o222)


def _link_over(source: Path, destination: Path) -> bool:
    """Make ``destination`` a hard link to ``source`` (atomically replacing what it names);
    False, leaving ``destination`` as it was, when no link can be made between them.
    """
    if destination.exists() and os.path.samefile(source, destination):
        return True
    temporary = destination.with_name(destination.name + _TMP_SUFFIX)
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    try:
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _read_only(destination)
    return True


def link_or_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> str:
    """A ``shutil.copytree`` ``copy_function``: a hard link where one can be made, else a copy."""
    if not _link_over(Path(source), Path(destination)):
        shutil.copy2(source, destination)
    return str(destination)


def share_identical_files(source_dir: Path, copy_dir: Path) -> SharedFiles:
    """Replace each file under ``copy_dir`` by a hard link to the file of the same relative path
    under ``source_dir``, when both hold the same bytes (checked byte for byte first).

    Files with no counterpart, different bytes, or on another filesystem stay copies.
    """
    shared = SharedFiles()
    for copy in sorted(p for p in copy_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        source = source_dir / copy.relative_to(copy_dir)
        size = copy.stat().st_size
        if source.is_file() and same_bytes(source, copy) and _link_over(source, copy):
            shared.linked_files += 1
            shared.linked_bytes += size
        else:
            shared.copied_files += 1
            shared.copied_bytes += size
    return shared


def link_local_model(model_uri: str, target: Path) -> Path | None:
    """Build ``target`` from hard links to a ``models:/`` URI's artifacts when they are local
    files (a copy per file where a link cannot be made); returns ``target``.

    None, touching nothing, for any other URI or a remote artifact store: download as usual.
    A local folder given as the URI is never linked: its owner may edit it in place.

    Raises:
        MlflowException: The URI names no model (as a download would).
    """
    if not model_uri.startswith("models:/"):
        return None
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(model_uri)
    inner = getattr(repo, "repo", repo)
    if not isinstance(inner, LocalArtifactRepository):
        return None
    source = Path(inner.artifact_dir)
    if not (source / "MLmodel").is_file():
        return None
    shutil.copytree(source, target, copy_function=link_or_copy, dirs_exist_ok=True)
    _log.info("Linked %s from %s into %s (no copy of its weights)", model_uri, source, target)
    return target
