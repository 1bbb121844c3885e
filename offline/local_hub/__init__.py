"""A Hugging Face hub on loopback, serving model repos from local folders.

Tests and the offline demo run the real ``huggingface_hub`` download code against this server,
so pinning, caching, resuming and error mapping are exercised exactly as they would be against
huggingface.co. The server is stdlib only (``http.server`` in a background thread) and imports
nothing from ``huggingface_hub``.

Layout, each module importing only the ones listed before it:

* :mod:`~offline.local_hub.git`: git and LFS bookkeeping: :class:`HubFile`, blob, tree and
  commit ids, LFS pointers, walking and copying a folder.
* :mod:`~offline.local_hub.routes`: the URL scheme, query parameters, byte ranges and the
  error responses (``X-Error-Code``) ``huggingface_hub`` maps to its exceptions.
* :mod:`~offline.local_hub.faults`: fault injection (:data:`FaultKind`) and what
  ``huggingface_hub`` does with each fault.
* :mod:`~offline.local_hub.state`: the hub's state: repos, commits, refs, tokens, pending faults
  and the request log (:class:`LoggedRequest`).
* :mod:`~offline.local_hub.handler`: the threading HTTP server and the request handler: every
  endpoint served.
* :mod:`~offline.local_hub.server`: :class:`LocalHub`, the server's lifecycle and public API.
* :mod:`~offline.local_hub.hf_endpoint`: :func:`use_hf_endpoint` and how to point
  ``huggingface_hub`` at the server.
* :mod:`~offline.local_hub.cli` and ``__main__``: ``python -m offline.local_hub --repo
  org/name=FOLDER``.
"""

from __future__ import annotations

from offline.local_hub.cli import main
from offline.local_hub.faults import FaultKind
from offline.local_hub.git import DEFAULT_LFS_PATTERNS, HubFile
from offline.local_hub.hf_endpoint import use_hf_endpoint
from offline.local_hub.server import LocalHub
from offline.local_hub.state import LoggedRequest

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "FaultKind",
    "HubFile",
    "LocalHub",
    "LoggedRequest",
    "main",
    "use_hf_endpoint",
]
