"""Git and LFS bookkeeping of the local hub: file ids, tree ids and commit shas.

Repos are git-like: every :meth:`~offline.local_hub.LocalHub.add_repo` is a commit whose sha is
the real git commit id of the folder's tree and its parent (fixed author and timestamp, so the
same folder and parent always give the same sha). Small files carry their git blob id as
``ETag``; LFS files (over ``lfs_threshold`` bytes, or matching ``lfs_patterns`` like the hub's
default ``.gitattributes``) carry their sha256 as ``ETag`` and ``X-Linked-Etag``, and their blob
id is the one of the LFS pointer file, as on the hub. No ``X-Xet-*`` header and no ``xetHash`` is
ever sent, so ``huggingface_hub`` always takes its plain HTTP path even with ``hf_xet`` installed.

This module is the bottom of the package: stdlib only, no other module of it imported.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "COMMIT_TITLE",
    "DEFAULT_LFS_PATTERNS",
    "DEFAULT_REVISION",
    "HubFile",
    "git_commit_oid",
    "git_object_oid",
    "git_trees",
    "ingest_file",
    "is_lfs",
    "walk",
]

# Always LFS whatever their size, as in the hub's default .gitattributes.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.onnx",
    "*.onnx.data",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.model",
)
DEFAULT_REVISION = "main"
#: The title of every commit (and the message the commit sha is computed from).
COMMIT_TITLE = "Upload folder with LocalHub"

_AUTHOR = b"LocalHub <local-hub@localhost> 0 +0000"
_SKIPPED_DIRS = frozenset({".git", ".cache/huggingface"})


@dataclass(frozen=True)
class HubFile:
    """One file of a commit, as the hub describes it.

    Attributes:
        path: Path in the repo, with ``/`` separators.
        size: Size in bytes.
        sha256: Hex sha256 of the content.
        git_oid: Git blob id: of the content for small files, of the LFS pointer for LFS files.
        lfs: Whether the file is stored with LFS.
        pointer_size: Size of the LFS pointer file, ``None`` for small files.
        blob: Where the bytes are read from when serving.
        stat_key: ``(size, mtime_ns)`` of ``blob`` for files served in place, ``None`` for copies.
    """

    path: str
    size: int
    sha256: str
    git_oid: str
    lfs: bool
    pointer_size: int | None
    blob: Path
    stat_key: tuple[int, int] | None = None

    @property
    def etag(self) -> str:
        """The ``ETag`` the hub sends: sha256 for LFS files, git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid


def is_lfs(rel_path: str, size: int, *, threshold: int, patterns: tuple[str, ...]) -> bool:
    """Whether a file is stored with LFS.

    Args:
        rel_path: Path in the repo, with ``/`` separators.
        size: Size in bytes.
        threshold: Files larger than this many bytes are LFS.
        patterns: Basename globs that are LFS whatever their size.

    Returns:
        ``True`` for an LFS file.
    """
    name = rel_path.rsplit("/", 1)[-1]
    return size > threshold or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def walk(folder: Path) -> Iterator[tuple[Path, str]]:
    """Yield ``(file, path in the repo)`` for every file under ``folder``, in sorted order.

    ``.git`` and ``.cache/huggingface`` are skipped; symlinks are followed (a hub cache
    snapshot is all symlinks).

    Args:
        folder: The folder to serve as a repo.

    Yields:
        Each file and its ``/``-separated path relative to ``folder``.
    """
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(
            name
            for name in dirnames
            if name != ".git" and (rel_dir / name).as_posix() not in _SKIPPED_DIRS
        )
        for name in sorted(filenames):
            source = Path(dirpath) / name
            if source.is_file():  # follows symlinks (a hub cache snapshot is all symlinks)
                yield source, (rel_dir / name).as_posix()


def ingest_file(source: Path, rel_path: str, *, lfs: bool, blobs_dir: Path | None) -> HubFile:
    """Hash a file (sha256, git blob id or LFS pointer id), copying it when asked.

    Args:
        source: The file to read.
        rel_path: Its path in the repo.
        lfs: Whether it is stored with LFS.
        blobs_dir: Where to copy its content (named by sha256); ``None`` serves it in place.

    Returns:
        The file as the hub describes it.

    Raises:
        RuntimeError: If the file changed size while being read.
    """
    stat = source.stat()
    size = stat.st_size
    sha256 = hashlib.sha256()
    git_blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
    copied = 0
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(open(source, "rb"))
        writer: BinaryIO | None = None
        if blobs_dir is not None:
            writer = stack.enter_context(tempfile.NamedTemporaryFile(dir=blobs_dir, delete=False))
        try:
            while chunk := reader.read(1024 * 1024):
                sha256.update(chunk)
                if not lfs:
                    git_blob.update(chunk)
                if writer is not None:
                    writer.write(chunk)
                copied += len(chunk)
        except BaseException:
            if writer is not None:
                Path(writer.name).unlink(missing_ok=True)
            raise
    if copied != size:
        if writer is not None:
            Path(writer.name).unlink(missing_ok=True)
        raise RuntimeError(f"{source} changed size while being read ({size} -> {copied} bytes).")
    digest = sha256.hexdigest()
    pointer_size: int | None = None
    git_oid = git_blob.hexdigest()
    if lfs:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n"
        pointer_size = len(pointer)
        git_oid = git_object_oid(b"blob", pointer.encode())
    if writer is None:
        return HubFile(
            path=rel_path,
            size=size,
            sha256=digest,
            git_oid=git_oid,
            lfs=lfs,
            pointer_size=pointer_size,
            blob=source.resolve(),
            stat_key=(size, stat.st_mtime_ns),
        )
    blob = blobs_dir / digest  # type: ignore[operator]  # writer implies blobs_dir
    os.replace(writer.name, blob)  # same content under the same name: replacing is harmless
    return HubFile(
        path=rel_path,
        size=size,
        sha256=digest,
        git_oid=git_oid,
        lfs=lfs,
        pointer_size=pointer_size,
        blob=blob,
    )


def git_object_oid(kind: bytes, body: bytes) -> str:
    r"""The git object id (sha1 of ``<kind> <size>\0<body>``) of a blob, tree or commit."""
    header = kind + b" %d\0" % len(body)
    return hashlib.sha1(header + body, usedforsecurity=False).hexdigest()


def git_trees(
    files: Mapping[str, HubFile],
) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Git tree ids of every directory, and each directory's children (sorted paths).

    Args:
        files: The commit's files, by path.

    Returns:
        ``(dirs, children)``: directory path (``""`` for the root) -> git tree id, and
        directory path -> child paths, directories first, each group sorted.
    """
    children: dict[str, set[str]] = {"": set()}
    for path in files:
        parts = path.split("/")
        for depth in range(len(parts)):
            parent = "/".join(parts[:depth])
            child = "/".join(parts[: depth + 1])
            children.setdefault(parent, set()).add(child)
            if depth < len(parts) - 1:
                children.setdefault(child, set())
    dirs: dict[str, str] = {}

    def tree_oid(directory: str) -> str:
        entries: list[tuple[bytes, bytes]] = []
        for child in children[directory]:
            name = child.rsplit("/", 1)[-1].encode()
            if child in children:
                entries.append(
                    (name + b"/", b"40000 " + name + b"\0" + bytes.fromhex(tree_oid(child)))
                )
            else:
                oid = bytes.fromhex(files[child].git_oid)
                entries.append((name, b"100644 " + name + b"\0" + oid))
        # Git orders tree entries by name, directories compared as if they ended with "/".
        body = b"".join(entry for _, entry in sorted(entries))
        dirs[directory] = git_object_oid(b"tree", body)
        return dirs[directory]

    tree_oid("")
    ordered = {
        directory: tuple(sorted(kids, key=lambda p: (p not in children, p)))
        for directory, kids in children.items()
    }
    return dirs, ordered


def git_commit_oid(tree: str, parent: str | None) -> str:
    """The git commit id of ``tree`` on ``parent``, with the hub's fixed author and title.

    Args:
        tree: Git tree id of the root directory.
        parent: Sha of the parent commit, ``None`` for a first commit.

    Returns:
        The 40-hex commit sha.
    """
    lines = [f"tree {tree}".encode()]
    if parent is not None:
        lines.append(f"parent {parent}".encode())
    lines += [b"author " + _AUTHOR, b"committer " + _AUTHOR, b"", COMMIT_TITLE.encode(), b""]
    return git_object_oid(b"commit", b"\n".join(lines))
