"""Pointing ``huggingface_hub`` 2.4 at a local hub.

* In a subprocess: set ``HF_ENDPOINT=hub.url`` in its environment (``huggingface_hub.constants``
  reads it at import time), and unset ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``.
* In-process, preferred: pass the endpoint explicitly, ``HfApi(endpoint=hub.url)``,
  ``hf_hub_download(..., endpoint=hub.url)``, ``snapshot_download(..., endpoint=hub.url)``.
  ``hf_hub_url`` swaps the import-time ``constants.ENDPOINT`` prefix for ``endpoint``.
* In-process, for code that takes no endpoint (``transformers``' ``from_pretrained``, the
  top-level ``huggingface_hub.model_info``...): :func:`use_hf_endpoint`. Setting
  ``os.environ["HF_ENDPOINT"]`` after import does nothing; three values must be patched:
  ``huggingface_hub.constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (formatted by
  ``hf_hub_url``) and ``huggingface_hub.hf_api.api.endpoint`` (the module-level ``HfApi`` behind
  ``huggingface_hub.model_info`` and friends, built at import). ``transformers`` keeps its own
  cached ``HfApi`` in ``transformers.utils.hub._hf_api``, patched too when already built.
* Offline mode: ``constants.is_offline_mode()`` returns the import-time
  ``constants.HF_HUB_OFFLINE``; with it set, every request raises ``OfflineModeIsEnabled``
  before reaching the server. Patch that attribute to toggle it in-process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["use_hf_endpoint"]


@contextlib.contextmanager
def use_hf_endpoint(url: str) -> Iterator[None]:
    """Point an already imported ``huggingface_hub`` (and ``transformers``) at ``url``.

    Patches ``huggingface_hub.constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
    the module-level ``HfApi`` behind ``huggingface_hub.model_info`` and friends,
    ``transformers``' cached ``HfApi`` when it exists, and ``os.environ["HF_ENDPOINT"]`` for
    subprocesses; everything is restored on exit. Not thread-safe: patch around a test, not
    inside concurrent code. Prefer passing ``endpoint=`` explicitly where the API takes it.

    Args:
        url: Base URL of the hub, e.g. ``LocalHub.url``.

    Yields:
        Nothing; the patch lasts for the ``with`` block.
    """
    # Imported here: the server itself never needs huggingface_hub, and importing the package
    # must stay light (the CLI and the hub run without it).
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    apis = [hf_api.api]
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if getattr(transformers_hub, "_hf_api", None) is not None:
        apis.append(transformers_hub._hf_api)  # type: ignore[union-attr]
    saved_constants = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE)
    saved_endpoints = [api.endpoint for api in apis]
    saved_env = os.environ.get("HF_ENDPOINT")
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    for api in apis:
        api.endpoint = url
    os.environ["HF_ENDPOINT"] = url
    try:
        yield
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE = saved_constants
        for api, endpoint in zip(apis, saved_endpoints, strict=True):
            api.endpoint = endpoint
        if saved_env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = saved_env
