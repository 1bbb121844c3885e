"""Fetch a pinned, verified snapshot of a hub repository.

The fetch resolves the requested revision to a commit sha first and downloads exactly that sha,
so a branch that moves during the download cannot mix two commits. Every file is checked against
the checksum the hub reports (sha256 for LFS files, the git blob id for the others) in a staging
folder, and only verified files are moved into the snapshot folder. The manifest is written last:
a snapshot folder with a manifest is complete, one without it is not.

Modules, each importing only those above it: `manifest` (the layout on disk, `ManifestEntry`,
`FetchResult`, reading and writing manifests), `errors` (huggingface_hub and transport errors
mapped to phi3ops errors), `connection` (endpoint, token, offline mode), `verify` (checksums),
`download` (one file into staging and the snapshot; disk space), `resolve` (revision to commit
sha, the files to fetch, the offline cache), and `fetch` (`fetch_snapshot`, `check_fetchable`
and the Prefect task).
"""

from tasks.hub.connection import resolve_hf_token
from tasks.hub.errors import is_transient
from tasks.hub.fetch import check_fetchable, fetch_snapshot, fetch_snapshot_task
from tasks.hub.manifest import MANIFEST_NAME, FetchResult, ManifestEntry, manifest_digest

__all__ = [
    "MANIFEST_NAME",
    "FetchResult",
    "ManifestEntry",
    "check_fetchable",
    "fetch_snapshot",
    "fetch_snapshot_task",
    "is_transient",
    "manifest_digest",
    "resolve_hf_token",
]
