"""Writing the build's files: UTF-8, stable formatting, parent folders created."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_json", "write_text"]


def write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON (non-ASCII kept) with a final newline.

    Args:
        path: File to write; its parent folders are created.
        payload: JSON-serialisable value.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8.

    Args:
        path: File to write; its parent folders are created.
        text: The content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
