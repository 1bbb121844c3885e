"""What names the served model's code: the digest of the `phi3_chat` package, every module of it.

The ONNX flavor's wrapper version is that digest, and it is part of the package key: a change
to any module makes the next packaging a new package instead of reusing a registered one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from phi3ops.serving.signatures import MODEL_ENTRY_FILE, MODEL_PACKAGE_DIR, model_package_digest
from phi3ops.sources import Flavor
from tasks.packaging import served_model_package, wrapper_version

MODULES = sorted(path.name for path in MODEL_PACKAGE_DIR.glob("*.py"))


def _copy(tmp_path: Path) -> Path:
    return Path(
        shutil.copytree(
            MODEL_PACKAGE_DIR,
            tmp_path / "phi3_chat",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    )


def test_the_onnx_wrapper_version_is_the_package_digest() -> None:
    assert served_model_package() == MODEL_PACKAGE_DIR == MODEL_ENTRY_FILE.parent
    assert wrapper_version(Flavor.ONNX) == f"sha256:{model_package_digest(MODEL_PACKAGE_DIR)}"
    assert "models_from_code.py" in MODULES and "model.py" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_a_change_to_any_module_changes_the_digest(tmp_path: Path, module: str) -> None:
    copy = _copy(tmp_path)
    assert model_package_digest(copy) == model_package_digest(MODEL_PACKAGE_DIR)
    (copy / module).write_text((copy / module).read_text() + "\n# one more line\n")
    assert model_package_digest(copy) != model_package_digest(MODEL_PACKAGE_DIR)


def test_a_renamed_or_added_module_changes_the_digest_bytecode_does_not(tmp_path: Path) -> None:
    copy = _copy(tmp_path)
    digest = model_package_digest(copy)
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (copy / "notes.txt").write_text("not code")
    assert model_package_digest(copy) == digest

    (copy / "batcher.py").rename(copy / "batching.py")
    renamed = model_package_digest(copy)
    assert renamed != digest
    (copy / "extra.py").write_text("")
    assert model_package_digest(copy) not in {digest, renamed}
