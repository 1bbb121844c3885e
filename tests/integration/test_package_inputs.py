"""The package flow's first step (`plan_package_task`) goes on only from a snapshot that is still
what its fetch verified, holds model data only, and fits on disk (the tiny Phi-3 from the local
hub; nothing is logged).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from phi3ops.errors import InsufficientDiskSpaceError, IntegrityError, UnsafeModelError
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant
from tasks.hub import MANIFEST_NAME, fetch_snapshot
from tasks.packaging import plan_package_task

plan_package = plan_package_task.fn  # the task's own code, without a Prefect run


@pytest.fixture
def onnx_snapshot(hub_with_tiny_phi3):
    return fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4)


def _onnx_file(fetched, suffix: str) -> Path:
    return next(p for p in fetched.model_dir.iterdir() if p.name.endswith(suffix))


def test_weights_altered_after_the_fetch_are_refused(onnx_snapshot) -> None:
    assert plan_package(onnx_snapshot, Flavor.ONNX).weights_dir == onnx_snapshot.model_dir
    weights = _onnx_file(onnx_snapshot, ".onnx.data")
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # same size
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="altered after its fetch") as info:
        plan_package(onnx_snapshot, Flavor.ONNX)
    assert weights.name in str(info.value)


def test_a_file_added_after_the_fetch_is_refused(onnx_snapshot) -> None:
    (onnx_snapshot.model_dir / "extra_config.json").write_text("{}")
    with pytest.raises(IntegrityError, match=r"extra_config\.json is not in the manifest"):
        plan_package(onnx_snapshot, Flavor.ONNX)


def test_a_shared_library_dropped_into_the_snapshot_is_refused(onnx_snapshot) -> None:
    (onnx_snapshot.model_dir / "libcustom_ops.so").write_bytes(b"\x7fELF")
    with pytest.raises(UnsafeModelError, match=r"libcustom_ops\.so: code"):
        plan_package(onnx_snapshot, Flavor.ONNX)


def test_custom_ops_library_written_into_genai_config_is_refused(onnx_snapshot) -> None:
    config_path = onnx_snapshot.model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = "libcustom_ops.so"
    config_path.write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError) as info:
        plan_package(onnx_snapshot, Flavor.ONNX)
    assert "genai_config.json: model.decoder.session_options.custom_ops_library" in str(info.value)


def test_a_genai_config_with_two_session_options_is_refused(onnx_snapshot) -> None:
    """Python's json keeps the last session_options, onnxruntime-genai applies the first."""
    config_path = onnx_snapshot.model_dir / "genai_config.json"
    clean = json.dumps(json.loads(config_path.read_text())["model"]["decoder"]["session_options"])
    text = config_path.read_text()
    evil = '"session_options": {"custom_ops_library": "evil.onnx.data"}, "session_options": '
    config_path.write_text(text.replace('"session_options": ', evil, 1))
    assert json.loads(config_path.read_text())["model"]["decoder"]["session_options"] == (
        json.loads(clean)
    )
    (onnx_snapshot.model_dir / "evil.onnx.data").write_bytes(b"\x7fELF" + bytes(100))
    with pytest.raises(UnsafeModelError) as info:
        plan_package(onnx_snapshot, Flavor.ONNX)
    message = str(info.value)
    assert "genai_config.json: key model.decoder.session_options appears more than once" in message
    assert "evil.onnx.data: code (an ELF" in message


def test_a_snapshot_whose_manifest_is_gone_or_rewritten_is_refused(onnx_snapshot) -> None:
    manifest_path = onnx_snapshot.local_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["sha256"] = "0" * 64  # a manifest edited to match a tampered file
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="not the one its fetch wrote"):
        plan_package(onnx_snapshot, Flavor.ONNX)
    manifest_path.unlink()
    with pytest.raises(IntegrityError, match="incomplete"):
        plan_package(onnx_snapshot, Flavor.ONNX)


def test_pytorch_weights_altered_after_the_fetch_are_refused(hub_with_tiny_phi3) -> None:
    fetched = fetch_snapshot(PYTORCH_REPO_ID, variant=Variant.PYTORCH)
    plan_package(fetched, Flavor.TRANSFORMERS)
    shard = next(fetched.local_dir.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match=re.escape(shard.name)):
        plan_package(fetched, Flavor.TRANSFORMERS)


def test_not_enough_disk_space_to_package(onnx_snapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(onnx_snapshot.local_dir)
    monkeypatch.setattr(
        "tasks.hub.download.shutil.disk_usage", lambda _p: usage._replace(free=1024 * 1024)
    )
    with pytest.raises(InsufficientDiskSpaceError, match="Packaging needs"):
        plan_package(onnx_snapshot, Flavor.ONNX)
