"""Downloading one file into a fetch's staging folder and verifying it; disk space.

Only verified files leave staging: a file that fails verification is deleted from staging and
the fetch fails. Moving verified files into the snapshot is the fetch's last step, after the
model-data checks (`tasks.hub.trust`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from phi3ops.errors import InsufficientDiskSpaceError, IntegrityError
from tasks.hub.manifest import ManifestEntry
from tasks.hub.verify import RemoteFile, hash_file, matches
from tasks.progress import hub_bar_class


def download_verified(
    remote: RemoteFile,
    *,
    repo_id: str,
    commit_sha: str,
    staging_dir: Path,
    endpoint: str | None,
    token: str | None,
) -> tuple[ManifestEntry, Path]:
    """Downloads one file of a commit into staging and verifies it against the hub's checksum.

    Safe to call from several threads at once for different files (huggingface_hub locks each
    file of ``staging_dir``, as its own ``snapshot_download`` workers rely on). huggingface_hub
    draws the file's progress bar on a terminal (`tasks.progress.hub_bar_class`).

    Args:
        remote: The file, as the hub lists it.
        repo_id: Hub repository, ``org/name``.
        commit_sha: The commit to download it from.
        staging_dir: This fetch's own staging folder.
        endpoint: Hub URL, or None for the default.
        token: Hugging Face token, or None.

    Returns:
        The verified file's manifest entry, and where it is in staging.

    Raises:
        IntegrityError: The downloaded bytes do not match the checksum (the file was deleted).
        Exception: Whatever huggingface_hub raises, untranslated (see `tasks.hub.errors`).
    """
    from huggingface_hub import hf_hub_download

    staged = Path(
        hf_hub_download(
            repo_id,
            remote.path,
            revision=commit_sha,
            local_dir=staging_dir,
            endpoint=endpoint,
            token=token or False,
            tqdm_class=hub_bar_class(),
        )
    )
    sha256, blob_id = hash_file(staged)
    size = staged.stat().st_size
    if size != remote.size or not matches(remote, sha256, blob_id):
        staged.unlink(missing_ok=True)
        expected = remote.sha256 or remote.blob_id
        actual = sha256 if remote.sha256 else blob_id
        raise IntegrityError(
            f"{repo_id}@{commit_sha[:12]}:{remote.path} failed verification "
            f"(expected {'sha256' if remote.sha256 else 'git blob'} {expected}, {remote.size} "
            f"bytes; got {actual}, {size} bytes). The bad file was deleted; fetch again. If it "
            f"persists, a proxy or mirror (HF_ENDPOINT) is serving wrong bytes."
        )
    return ManifestEntry(path=remote.path, size=size, sha256=sha256), staged


def check_disk_space(root: Path, needed: int, headroom: int, *, purpose: str = "Fetching") -> None:
    """Fails before writing when ``needed`` bytes plus ``headroom`` do not fit under ``root``.

    Args:
        root: Where the bytes go (the nearest existing parent is measured when it is missing).
        needed: Bytes about to be written.
        headroom: Bytes to leave free.
        purpose: What needs the space, for the message (``"Fetching"``, ``"Packaging"``).

    Raises:
        InsufficientDiskSpaceError: Not enough free space.
    """
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + headroom > free:
        raise InsufficientDiskSpaceError(
            f"{purpose} needs {_gib(needed)} (+{_gib(headroom)} headroom) but {probe} has only "
            f"{_gib(free)} free. Free some space, or point PHI3OPS_DATA_DIR (or TMPDIR) at a "
            f"larger disk."
        )


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"
