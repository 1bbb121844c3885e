"""A tiny random Phi-3, laid out like the real hub repositories, built offline.

Real Phi-3 weights cannot be downloaded on these machines, so tests, the demo and the
benchmarks use a small random ``Phi3ForCausalLM`` that this package builds deterministically
from a :class:`TinyPhi3Recipe`:

* ``<root>/microsoft/Phi-3-mini-4k-instruct/``: like the PyTorch repo: ``config.json``,
  ``generation_config.json``, two safetensors shards with ``model.safetensors.index.json``,
  a byte-level BPE tokenizer carrying the Phi-3 special tokens and chat template
  (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), ``README.md``
  and ``LICENSE``.
* ``<root>/microsoft/Phi-3-mini-4k-instruct-onnx/``: like the ONNX repo: ``README.md``,
  ``LICENSE`` and the int4 CPU build under :data:`ONNX_CPU_INT4_SUBFOLDER` (made by
  :func:`tasks.onnx_build.build_onnx_int4`).

So ``<root>/<repo id>`` is each repository, ready for a local hub server to serve.

:func:`ensure_tiny_phi3` builds a recipe once into ``<cache_root>/<recipe hash>/`` and reuses
it afterwards. Nothing here touches disk at import time, and torch, transformers, tokenizers
and onnxruntime-genai are imported only when a build runs.

Layout, each module importing only the ones listed before it:

* :mod:`~offline.tiny_phi3.files`: writing JSON and text files.
* :mod:`~offline.tiny_phi3.tokenizer`: Phi-3's special tokens and chat template, and the
  byte-level BPE tokenizer trained on a fixed corpus.
* :mod:`~offline.tiny_phi3.recipe`: :class:`TinyPhi3Recipe`, the presets, the cache key and
  :class:`TinyPhi3Repos` (where each repo lives).
* :mod:`~offline.tiny_phi3.cards`: the model cards and license.
* :mod:`~offline.tiny_phi3.build`: :func:`build_tiny_phi3`, one uncached build.
* this ``__init__``: the public API, :func:`ensure_tiny_phi3` (the build cache) and
  :func:`main`; ``__main__`` runs ``python -m offline.tiny_phi3 OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from offline.tiny_phi3.build import build_tiny_phi3, is_complete
from offline.tiny_phi3.recipe import (
    BENCH,
    MINI,
    ONNX_CPU_INT4_FILENAME,
    PRESETS,
    TINY,
    TinyPhi3Recipe,
    TinyPhi3Repos,
    build_code_version,
)
from offline.tiny_phi3.tokenizer import PHI3_CHAT_TEMPLATE
from phi3ops.errors import InvalidInputError
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, ONNX_REPO_ID, PYTORCH_REPO_ID

__all__ = [
    "BENCH",
    "MINI",
    "ONNX_CPU_INT4_FILENAME",
    "ONNX_CPU_INT4_SUBFOLDER",
    "ONNX_REPO_ID",
    "PHI3_CHAT_TEMPLATE",
    "PRESETS",
    "PYTORCH_REPO_ID",
    "TINY",
    "TinyPhi3Recipe",
    "TinyPhi3Repos",
    "build_code_version",
    "build_tiny_phi3",
    "ensure_tiny_phi3",
    "main",
]

# ensure_tiny_phi3 and main live here, not in a submodule, because they call
# build_tiny_phi3 through this package's namespace: replacing offline.tiny_phi3.build_tiny_phi3
# (tests swap in a fake build) changes what they build.


def ensure_tiny_phi3(cache_root: Path, recipe: TinyPhi3Recipe = TINY) -> TinyPhi3Repos:
    """Build the tiny Phi-3 repositories once into ``cache_root`` and return them.

    The build goes to ``cache_root/<recipe hash>/``; a later call with the same recipe (and
    library versions) returns that folder without building. Builds happen in a temporary
    folder renamed into place at the end, under a file lock, so concurrent or interrupted
    builds never leave a half-built cache behind.

    Args:
        cache_root: Folder for cached builds (created if missing).
        recipe: What to build; :data:`TINY` (default), :data:`BENCH` or :data:`MINI`
            (Phi-3-mini's real shape: minutes and about 10.5 GB at peak).

    Returns:
        The paths of the built repositories.

    Raises:
        InvalidInputError: ``cache_root`` exists but is not a folder.
        OnnxBuildError: The ONNX build failed.
    """
    # Imported here, as the build's other dependencies: only needed when a build may run.
    from filelock import FileLock

    cache_root = Path(cache_root)
    if cache_root.exists() and not cache_root.is_dir():
        raise InvalidInputError(
            f"cache_root {cache_root} is a file, not a folder. Pass a folder for the tiny Phi-3."
        )
    key = recipe.cache_key()
    repos = TinyPhi3Repos.at(cache_root / key, recipe)
    if is_complete(repos.root):
        return repos

    cache_root.mkdir(parents=True, exist_ok=True)
    # The lock only saves duplicate work; the atomic rename alone keeps the cache consistent.
    with FileLock(str(cache_root / f".{key}.lock")):
        if is_complete(repos.root):
            return repos
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.building-", dir=cache_root))
        try:
            build_tiny_phi3(staging / "root", recipe)
            if repos.root.exists():
                # Not complete (checked above under the lock): debris from an older layout.
                shutil.rmtree(repos.root)
            os.replace(staging / "root", repos.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return repos


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or reuse) a tiny Phi-3 under OUT_DIR and print where its repositories are.

    Args:
        argv: Command-line arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m offline.tiny_phi3",
        description="Build a tiny random Phi-3 laid out like the Hugging Face repositories.",
    )
    parser.add_argument("out_dir", type=Path, help="cache folder; the build goes to a subfolder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    args = parser.parse_args(argv)
    recipe = PRESETS[args.preset]
    repos = ensure_tiny_phi3(args.out_dir, recipe)
    print(
        json.dumps(
            {
                "recipe": args.preset,
                "parameters": recipe.num_parameters,
                "recipe_hash": repos.recipe_hash,
                "root": str(repos.root),
                PYTORCH_REPO_ID: str(repos.pytorch_dir),
                ONNX_REPO_ID: str(repos.onnx_dir),
                "onnx_model_dir": str(repos.onnx_model_dir),
            },
            indent=2,
        )
    )
    return 0
