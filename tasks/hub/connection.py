"""Where the hub is, as whom to reach it, and whether to reach it at all.

The endpoint comes from the caller, ``PHI3OPS_HF_ENDPOINT``, ``HF_ENDPOINT``, then the hub; the
token from ``HF_TOKEN``, else a Prefect Secret block; offline mode from ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine

from phi3ops.errors import InvalidInputError
from phi3ops.settings import get_settings


def endpoint(explicit: str | None) -> str | None:
    """The hub URL to use: ``explicit``, else ``PHI3OPS_HF_ENDPOINT``, else ``HF_ENDPOINT``.

    Args:
        explicit: The caller's endpoint, if any.

    Returns:
        The URL, or None for huggingface_hub's default (the public hub).
    """
    return explicit or get_settings().hf_endpoint or os.environ.get("HF_ENDPOINT") or None


def resolve_hf_token(secret_block: str | None = None) -> str | None:
    """The Hugging Face token: ``HF_TOKEN`` first, else the named Prefect Secret block.

    Args:
        secret_block: Name of a Prefect ``Secret`` block; defaults to
            ``Settings.hf_token_secret_block``.

    Returns:
        The token, or None when neither source has one (public repositories need none).

    Raises:
        InvalidInputError: The Secret block named does not exist.
    """
    token = os.environ.get("HF_TOKEN") or None
    if token:
        return token
    block_name = secret_block or get_settings().hf_token_secret_block
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(block_name)
    except ValueError as exc:
        raise InvalidInputError(
            f"Prefect Secret block {block_name!r} (PHI3OPS_HF_TOKEN_SECRET_BLOCK) does not exist. "
            f"Create it with `prefect block create secret` or unset the setting and use HF_TOKEN."
        ) from exc
    # Block.load hands back a coroutine instead when an event loop is running (an async flow,
    # a notebook): this function is synchronous, so it cannot wait for one.
    if isinstance(secret, Coroutine):
        secret.close()
        raise RuntimeError(
            f"Prefect Secret block {block_name!r} cannot be loaded synchronously while an event "
            f"loop is running; set HF_TOKEN instead."
        )
    return secret.get() or None


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set, read now rather than when huggingface_hub was imported."""
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a process that
    # sets it later (tests, notebooks) is honoured too.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return constants.is_offline_mode() or env in {"1", "ON", "YES", "TRUE"}
