"""Nothing trusted blindly: model folders are data, and a snapshot must still match its manifest.

Which files and ``genai_config.json`` settings are model data is decided in one place, the
served model's package (`phi3_chat.folder.model_file_problems`): it checks its own folder again
at load time and may import nothing of phi3ops, so the fetch and packaging tasks import the
check from there and raise phi3ops errors.

What a fetch takes in, of the files the variant's patterns match:

* model data: names ending in ``MODEL_FILE_SUFFIXES`` (``.onnx``, ``.onnx.data``,
  ``.onnx_data``, ``.safetensors``, ``.json``, ``.model``, ``.jinja``, ``.txt``, ``.md``) or
  named in ``MODEL_FILE_NAMES`` (``LICENSE``, ``LICENCE``, ``NOTICE``);
* Python files (``.py``) are skipped, never downloaded: Microsoft's Phi-3 repositories ship
  ``configuration_phi3.py`` / ``modeling_phi3.py`` for ``trust_remote_code``, which phi3ops
  never sets (transformers has Phi-3 natively, and onnxruntime-genai reads no Python);
* anything else (shared libraries, executables, pickles, unknown types) fails the fetch before
  any download, naming each file; so does a ``genai_config.json`` that loads a library
  (``custom_ops_library``), names an execution provider other than ``cpu``, sets a session
  option off the allowlist, or points a ``filename`` outside its folder, right after its
  download (configs go first), before it lands in the snapshot folder;
* and each file is checked by its bytes right after its download, before it lands in the
  snapshot folder (and when a cached copy is reused): one that starts like an executable or
  script (ELF, Mach-O, PE, ``#!``) is refused whatever its name, and a ``.json`` file that is not
  valid JSON or repeats a key anywhere (onnxruntime-genai applies the first of two
  ``session_options``, Python the last) is refused naming the key.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

from phi3_chat.folder import (
    ALLOWED_PROVIDERS,
    GENAI_CONFIG,
    MODEL_FILE_NAMES,
    MODEL_FILE_SUFFIXES,
    model_file_problems,
    model_folder_problems,
)
from phi3ops.errors import IntegrityError, UnsafeModelError
from phi3ops.settings import get_settings
from phi3ops.tracking import tracking_uri
from tasks.hub.download import check_disk_space
from tasks.hub.manifest import (
    MANIFEST_NAME,
    FetchResult,
    ManifestEntry,
    manifest_digest,
    read_manifest,
)
from tasks.hub.verify import sha256_file

logger = logging.getLogger(__name__)

#: Files a fetch leaves out instead of refusing (see the module doc).
SKIPPED_SUFFIXES = (".py",)


def skipped(path: str) -> bool:
    """Whether a fetch leaves this repository file out (Python code nothing here runs)."""
    return path.lower().endswith(SKIPPED_SUFFIXES)


def refuse_unsafe(files: Mapping[str, Path | None], *, where: str) -> None:
    """Fails when any of the files is not model data.

    Args:
        files: Each file's path in the repository (or folder), mapped to where its bytes are
            now, or to None to check its name only.
        where: What the files are, for the message (``org/name@sha``, a folder).

    Raises:
        UnsafeModelError: The message names each file and ``genai_config.json`` key refused.
    """
    problems = model_file_problems(
        {path: None if location is None else str(location) for path, location in files.items()}
    )
    _raise_if_unsafe(problems, where)


def refuse_unsafe_folder(folder: Path, *, where: str) -> None:
    """`refuse_unsafe` for every file under ``folder`` (links and special files refused too).

    Raises:
        UnsafeModelError: The message names each file and ``genai_config.json`` key refused.
    """
    _raise_if_unsafe(model_folder_problems(str(folder)), where)


def _raise_if_unsafe(problems: list[str], where: str) -> None:
    if not problems:
        return
    raise UnsafeModelError(
        f"{where} is refused: {'; '.join(problems)}. phi3ops takes a model folder as data "
        f"only: files ending in {', '.join(MODEL_FILE_SUFFIXES)} or named "
        f"{', '.join(MODEL_FILE_NAMES)}, none of them an executable or script by its bytes, "
        f"JSON files that parse with each key once, and a {GENAI_CONFIG} that loads no library "
        f"(custom_ops_library), names no execution provider but {', '.join(ALLOWED_PROVIDERS)} "
        f"and sets only known session options. Fetch a repository or revision that holds only "
        f"model data, or remove the file or key from your own model and publish it again."
    )


def snapshot_problems(snapshot_dir: Path, entries: list[ManifestEntry]) -> list[str]:
    """Each manifest entry whose file is missing, or differs in size or sha256 (re-hashed)."""
    problems = []
    for entry in entries:
        path = snapshot_dir / entry.path
        if not path.is_file():
            problems.append(f"{entry.path} is missing")
        elif path.stat().st_size != entry.size:
            problems.append(f"{entry.path} has {path.stat().st_size} bytes, not {entry.size}")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path} does not match its sha256 {entry.sha256[:12]}...")
    return problems


def check_snapshot(fetched: FetchResult) -> None:
    """Refuses a snapshot that is not, byte for byte, what its fetch verified.

    The manifest must be there and be the fetch's (same commit and digest, its digest
    recomputed from its entries); every file it lists must re-hash to its sha256; the snapshot
    may hold no file it does not list; and every file must be model data. Costs one read of
    the snapshot.

    Args:
        fetched: The snapshot, as the fetch returned it.

    Raises:
        UnsafeModelError: A file or ``genai_config.json`` setting is not model data.
        IntegrityError: The snapshot was altered since its fetch (or never completed).
    """
    snapshot_dir = Path(fetched.local_dir)
    where = f"The snapshot {snapshot_dir} ({fetched.repo_id}@{fetched.commit_sha[:12]})"
    fix = (
        "Fetch the commit again (a fetch re-hashes the snapshot, downloads what differs and "
        "removes what it does not list); if it happens again, check what writes there."
    )
    refuse_unsafe_folder(snapshot_dir, where=where)
    manifest = read_manifest(snapshot_dir)
    if manifest is None:
        raise IntegrityError(f"{where} has no readable {MANIFEST_NAME}: it is incomplete. {fix}")
    entries = [ManifestEntry(**f) for f in manifest.get("files", [])]
    recorded = manifest.get("manifest_digest")
    if (
        manifest.get("commit_sha") != fetched.commit_sha
        or recorded != fetched.manifest_digest
        or manifest_digest(fetched.repo_id, fetched.commit_sha, entries) != recorded
    ):
        raise IntegrityError(
            f"{where}: its {MANIFEST_NAME} is not the one its fetch wrote (commit or digest "
            f"differs from {fetched.manifest_digest[:12]}...). {fix}"
        )
    problems = snapshot_problems(snapshot_dir, entries)
    listed = {entry.path for entry in entries} | {MANIFEST_NAME}
    problems += [
        f"{path} is not in the manifest"
        for path in sorted(
            p.relative_to(snapshot_dir).as_posix() for p in snapshot_dir.rglob("*") if p.is_file()
        )
        if path not in listed
    ]
    if problems:
        raise IntegrityError(f"{where} was altered after its fetch: {'; '.join(problems)}. {fix}")
    logger.info("Snapshot %s matches its manifest (%d files)", snapshot_dir, len(entries))


def check_before_packaging(fetched: FetchResult, folder: Path) -> None:
    """Everything packaging needs to be true before it copies ``folder`` (the one it packages).

    The snapshot still matches its manifest and holds model data only (`check_snapshot`);
    ``folder``, which may be an ONNX build outside the snapshot, holds model data only; and
    there is room for the copies logging makes: MLflow's temporary copy (``TMPDIR``) and, with
    the embedded store, the artifact under ``PHI3OPS_DATA_DIR`` (both on one disk: both).

    Args:
        fetched: The snapshot, as the fetch returned it.
        folder: The folder the flavor packages.

    Raises:
        UnsafeModelError: A file or ``genai_config.json`` setting is not model data.
        IntegrityError: The snapshot was altered since its fetch.
        InsufficientDiskSpaceError: The copies would not fit.
    """
    check_snapshot(fetched)
    refuse_unsafe_folder(folder, where=f"The model folder {folder}")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    targets = [Path(tempfile.gettempdir())]
    if tracking_uri().startswith("sqlite:"):
        targets.append(get_settings().data_dir)
    needed: dict[int, tuple[Path, int]] = {}
    for target in targets:
        probe = _existing(target)
        device = probe.stat().st_dev
        needed[device] = (probe, needed.get(device, (probe, 0))[1] + size)
    for probe, total in needed.values():
        check_disk_space(probe, total, get_settings().disk_headroom_bytes, purpose="Packaging")


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
