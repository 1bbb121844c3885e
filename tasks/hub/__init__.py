"""Fetch a pinned, verified snapshot of a hub repository.

The fetch resolves the requested revision to a commit sha first and downloads exactly that sha,
so a branch that moves during the download cannot mix two commits. Every file is checked against
the checksum the hub reports (sha256 for LFS files, the git blob id for the others) in a staging
folder, and only verified files are moved into the snapshot folder. The manifest is written last:
a snapshot folder with a manifest is complete, one without it is not.

Nothing from the hub is trusted blindly: every request waits at most ``PHI3OPS_HUB_TIMEOUT_S``,
each fetch stages its downloads in a folder of its own, files already on disk are re-hashed,
and only model data is taken in (no shared libraries or executables, no ``genai_config.json``
that loads code); `check_before_packaging` checks a snapshot again before it is packaged.

Modules, each importing only those above it: `manifest` (the layout on disk, `ManifestEntry`,
`FetchResult`, reading and writing manifests, staging folders), `timeouts` (the bounded HTTP
client), `errors` (huggingface_hub and transport errors mapped to phi3ops errors), `connection`
(endpoint, token, offline mode), `verify` (checksums), `download` (one file into staging; disk
space), `trust` (model data only; a snapshot against its manifest, before packaging), `resolve`
(revision to commit sha, the files to fetch, the offline cache), and `fetch` (`fetch_snapshot`,
`check_fetchable` and the Prefect task).
"""

from tasks.hub.connection import resolve_hf_token
from tasks.hub.download import check_disk_space
from tasks.hub.errors import is_transient
from tasks.hub.fetch import check_fetchable, fetch_snapshot, fetch_snapshot_task
from tasks.hub.manifest import MANIFEST_NAME, FetchResult, ManifestEntry, manifest_digest
from tasks.hub.trust import check_before_packaging, check_snapshot, refuse_unsafe_folder

__all__ = [
    "MANIFEST_NAME",
    "FetchResult",
    "ManifestEntry",
    "check_before_packaging",
    "check_disk_space",
    "check_fetchable",
    "check_snapshot",
    "fetch_snapshot",
    "fetch_snapshot_task",
    "is_transient",
    "manifest_digest",
    "refuse_unsafe_folder",
    "resolve_hf_token",
]
