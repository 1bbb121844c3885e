"""The transformers flavor's inputs, read from a PyTorch Phi-3 checkpoint: its declared dtype,
its text-generation pipeline, and its own model card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from phi3ops.errors import PackagingError

__all__ = ["checkpoint_dtype", "load_text_generation_pipeline", "local_model_card"]

logger = logging.getLogger(__name__)


def checkpoint_dtype(weights_dir: Path) -> str:
    """The torch dtype a Hugging Face checkpoint declares (``dtype``, formerly ``torch_dtype``)."""
    config = json.loads((weights_dir / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def load_text_generation_pipeline(weights_dir: Path, *, dtype: str) -> Any:
    """The checkpoint's text-generation pipeline on CPU, in ``dtype`` (a torch dtype name).

    Raises:
        PackagingError: transformers or torch is missing, the dtype is not a torch dtype, or
            the checkpoint does not load.
    """
    try:
        import torch
        from transformers import pipeline
    except ImportError as exc:
        raise PackagingError(
            f"The transformers flavor needs transformers and torch ({exc}). Install phi3ops "
            f"with its constraints (`make install`)."
        ) from exc
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PackagingError(
            f"{weights_dir / 'config.json'} declares dtype {dtype!r}, which is not a torch dtype. "
            f"Fix the checkpoint's config (e.g. 'bfloat16')."
        )
    try:
        return pipeline(
            "text-generation",
            model=str(weights_dir),
            tokenizer=str(weights_dir),
            dtype=torch_dtype,
            device="cpu",
        )
    except Exception as exc:
        raise PackagingError(
            f"Could not load a text-generation pipeline from {weights_dir} "
            f"({type(exc).__name__}: {exc}). Check that the snapshot is a complete "
            f"transformers checkpoint."
        ) from exc


def local_model_card(weights_dir: Path) -> Any:
    """The checkpoint's README.md as a model card (its declared license), or None."""
    readme = weights_dir / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme)
    except Exception:  # a malformed card is no reason to fail packaging
        logger.warning("Ignoring the unreadable model card %s", readme, exc_info=True)
        return None
