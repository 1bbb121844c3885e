"""Hard links instead of copies of the weights (phi3ops.weights_links), and their fallbacks."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from phi3ops.weights_links import (
    link_local_model,
    link_or_copy,
    local_artifact_dir,
    share_identical_files,
)


def _inode(path: Path) -> tuple[int, int]:
    return path.stat().st_dev, path.stat().st_ino


@pytest.fixture
def source_and_copy(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "snapshot"
    (source / "sub").mkdir(parents=True)
    (source / "model.onnx.data").write_bytes(b"w" * 3_000_000)
    (source / "sub" / "genai_config.json").write_text("{}")
    (source / "differs.json").write_text('{"a": 1}')
    copy = tmp_path / "artifacts" / "model_dir"
    shutil.copytree(source, copy)
    (copy / "differs.json").write_text('{"a": 2}')  # same name, other bytes: never linked
    (copy / "only_here.txt").write_text("x")  # no counterpart: stays
    return source, copy


def test_identical_files_become_read_only_links_and_the_others_stay_copies(
    source_and_copy: tuple[Path, Path],
) -> None:
    source, copy = source_and_copy
    shared = share_identical_files(source, copy)
    assert (shared.linked_files, shared.copied_files) == (2, 2)
    assert shared.linked_bytes == 3_000_002
    for name in ("model.onnx.data", "sub/genai_config.json"):
        assert _inode(source / name) == _inode(copy / name)
        assert not (copy / name).stat().st_mode & 0o222  # one inode: both names read-only
    assert _inode(source / "differs.json") != _inode(copy / "differs.json")
    assert (copy / "differs.json").read_text() == '{"a": 2}'
    assert not list(copy.rglob("*.phi3ops-link"))
    # Again: nothing changes. Removing one side leaves the other whole.
    assert share_identical_files(source, copy).linked_files == 2
    shutil.rmtree(copy)
    assert (source / "model.onnx.data").stat().st_size == 3_000_000


def test_another_filesystem_keeps_the_copy(
    source_and_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    source, copy = source_and_copy
    shared = share_identical_files(source, copy)
    assert (shared.linked_files, shared.copied_files) == (0, 4)
    assert _inode(source / "model.onnx.data") != _inode(copy / "model.onnx.data")
    assert (copy / "model.onnx.data").read_bytes() == (source / "model.onnx.data").read_bytes()
    target = copy.parent / "served"
    shutil.copytree(source, target, copy_function=link_or_copy)
    assert (target / "sub" / "genai_config.json").read_text() == "{}"
    assert _inode(target / "sub" / "genai_config.json") != _inode(source / "sub/genai_config.json")


def test_other_link_errors_are_not_swallowed(
    source_and_copy: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_space)
    with pytest.raises(OSError, match="No space"):
        share_identical_files(*source_and_copy)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "file:///data/mlartifacts/1/models/m-1/artifacts",
            "/data/mlartifacts/1/models/m-1/artifacts",
        ),
        ("/data/mlruns/0/models/m-1/artifacts", "/data/mlruns/0/models/m-1/artifacts"),
        ("s3://bucket/1/models/m-1/artifacts", None),
        ("mlflow-artifacts:/1/models/m-1/artifacts", None),
        ("http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1", None),
    ],
)
def test_only_a_local_artifact_store_is_linked(uri: str, expected: str | None) -> None:
    found = local_artifact_dir(uri)
    assert (str(found) if found else None) == expected


def test_only_models_uris_are_linked_by_the_server(tmp_path: Path) -> None:
    # A folder the user owns may be edited in place: it is copied, never linked.
    assert link_local_model(str(tmp_path), tmp_path / "target") is None
    assert link_local_model("runs:/abc/model", tmp_path / "target") is None
    assert not (tmp_path / "target").exists()
