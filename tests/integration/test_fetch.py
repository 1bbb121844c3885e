"""The fetch stage against the local hub: pinning, verification, faults, offline, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from phi3ops.errors import (
    HubAccessDeniedError,
    HubUnreachableError,
    InsufficientDiskSpaceError,
    IntegrityError,
    InvalidInputError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    TransientHubError,
)
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER, Variant
from tasks.hub import MANIFEST_NAME, fetch_snapshot

ONNX_REPO = "acme/phi-mini-onnx"
TORCH_REPO = "acme/phi-mini"
WEIGHTS = f"{ONNX_CPU_INT4_SUBFOLDER}/model.onnx.data"


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _onnx_layout(folder: Path, seed: int = 0) -> Path:
    """A repo shaped like microsoft/Phi-3-mini-4k-instruct-onnx, with random 'weights'."""
    rnd = hashlib.sha256(str(seed).encode()).digest() * 70_000  # ~2.2 MB: an LFS file
    return _write(
        folder,
        {
            "README.md": b"# model card\n",
            "LICENSE": b"MIT\n",
            f"{ONNX_CPU_INT4_SUBFOLDER}/genai_config.json": json.dumps({"seed": seed}).encode(),
            f"{ONNX_CPU_INT4_SUBFOLDER}/model.onnx": b"onnx-graph" * 100,
            WEIGHTS: rnd,
            f"{ONNX_CPU_INT4_SUBFOLDER}/tokenizer.json": b'{"model": {}}',
            "cuda/cuda-int4/model.onnx": b"not for the cpu variant",
            "sample.py": b"print('not fetched')\n",
        },
    )


@pytest.fixture
def onnx_repo(local_hub, tmp_path: Path) -> tuple[object, str]:
    sha = local_hub.add_repo(ONNX_REPO, _onnx_layout(tmp_path / "src-onnx"))
    return local_hub, sha


@pytest.fixture(autouse=True)
def _instant_backoff(no_backoff_sleep) -> None:
    """huggingface_hub's own retry waits (1-8 s) are recorded, not slept."""


def _fetch(hub, repo_id: str = ONNX_REPO, **kwargs):
    kwargs.setdefault("endpoint", hub.url)
    return fetch_snapshot(repo_id, **kwargs)


def _downloads(hub) -> list:
    return [r for r in hub.requests if r.method == "GET" and r.endpoint == "resolve"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def test_fetch_pins_sha_verifies_and_writes_manifest(onnx_repo, tmp_path: Path) -> None:
    hub, sha = onnx_repo
    result = _fetch(hub, revision="main")

    assert result.commit_sha == sha
    assert result.local_dir.name == sha
    assert result.model_dir == result.local_dir / ONNX_CPU_INT4_SUBFOLDER
    src = _tree(tmp_path / "src-onnx")
    wanted = {k: v for k, v in src.items() if k.startswith(ONNX_CPU_INT4_SUBFOLDER)}
    wanted |= {"README.md": src["README.md"], "LICENSE": src["LICENSE"]}
    assert _tree(result.local_dir) == wanted  # only the variant's files, byte for byte
    manifest = json.loads((result.local_dir / MANIFEST_NAME).read_text())
    assert manifest["commit_sha"] == sha
    assert manifest["manifest_digest"] == result.manifest_digest
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        k: hashlib.sha256(v).hexdigest() for k, v in wanted.items()
    }
    assert result.total_bytes == sum(len(v) for v in wanted.values())
    assert result.downloaded_bytes == result.total_bytes
    # Every download asked for the resolved sha, never the moving branch name.
    assert _downloads(hub) and all(f"/resolve/{sha}/" in r.path for r in _downloads(hub))


def test_second_fetch_of_same_sha_downloads_nothing(onnx_repo) -> None:
    hub, _ = onnx_repo
    first = _fetch(hub)
    hub.clear_requests()
    second = _fetch(hub)
    assert _downloads(hub) == []
    assert second.downloaded_bytes == 0
    assert second.manifest_digest == first.manifest_digest


def test_moved_branch_gets_new_snapshot_and_old_sha_stays_fetchable(
    onnx_repo, tmp_path: Path
) -> None:
    hub, old_sha = onnx_repo
    old = _fetch(hub)
    new_sha = hub.add_repo(ONNX_REPO, _onnx_layout(tmp_path / "src-onnx-2", seed=1))
    new = _fetch(hub, revision="main")
    assert new.commit_sha == new_sha != old_sha
    assert new.manifest_digest != old.manifest_digest
    pinned = _fetch(hub, revision=old_sha)
    assert pinned.local_dir == old.local_dir
    assert pinned.manifest_digest == old.manifest_digest


def test_pytorch_variant_takes_weights_and_configs(local_hub, tmp_path: Path) -> None:
    src = _write(
        tmp_path / "src-torch",
        {
            "config.json": b"{}",
            "model-00001-of-00002.safetensors": b"\x01" * 2_000_000,
            "model-00002-of-00002.safetensors": b"\x02" * 1000,
            "model.safetensors.index.json": b"{}",
            "tokenizer.json": b"{}",
            "images/plot.png": b"png",
            "sample_finetune.py": b"",
        },
    )
    local_hub.add_repo(TORCH_REPO, src)
    result = _fetch(local_hub, TORCH_REPO, variant=Variant.PYTORCH)
    assert result.model_dir == result.local_dir
    assert set(_tree(result.local_dir)) == {
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    }


def test_variant_with_no_files_names_the_right_repo(local_hub, tmp_path: Path) -> None:
    local_hub.add_repo(TORCH_REPO, _write(tmp_path / "t", {"config.json": b"{}"}))
    with pytest.raises(RemoteFileNotFoundError, match="Phi-3-mini-4k-instruct-onnx"):
        _fetch(local_hub, TORCH_REPO, variant=Variant.ONNX_CPU_INT4)


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["server_error", "rate_limit"])
def test_transient_errors_recover(onnx_repo, fault: str) -> None:
    hub, sha = onnx_repo
    hub.inject(fault, count=2, path=f"*{WEIGHTS}")
    result = _fetch(hub)
    assert result.commit_sha == sha
    assert (result.local_dir / WEIGHTS).stat().st_size == 2_240_000


def test_dropped_connection_mid_file_recovers(onnx_repo, tmp_path: Path) -> None:
    hub, _ = onnx_repo
    hub.inject("drop_connection", count=1, path=f"*{WEIGHTS}")
    result = _fetch(hub)
    expected = (tmp_path / "src-onnx" / WEIGHTS).read_bytes()
    assert (result.local_dir / WEIGHTS).read_bytes() == expected


def test_persistent_server_errors_are_transient_for_the_retry_policy(onnx_repo) -> None:
    hub, _ = onnx_repo
    hub.inject("server_error", count=1000)
    with pytest.raises(TransientHubError, match="retried"):
        _fetch(hub)


def test_corrupted_bytes_are_rejected_and_nothing_is_left(onnx_repo, tmp_path: Path) -> None:
    hub, sha = onnx_repo
    hub.inject("corrupt", count=1, path=f"*{WEIGHTS}")
    root = tmp_path / "snapshots"
    with pytest.raises(IntegrityError, match="deleted") as info:
        _fetch(hub, target_root=root)
    assert WEIGHTS in str(info.value)
    snapshot = root / ONNX_REPO.replace("/", "--") / sha
    assert not (snapshot / WEIGHTS).exists()
    assert not (snapshot / MANIFEST_NAME).exists()  # no manifest: the snapshot is incomplete
    assert list((root / ".staging").rglob("model.onnx.data")) == []  # not even staged
    # A clean retry then completes, re-using the files that were already verified.
    hub.clear_requests()
    result = _fetch(hub, target_root=root)
    assert (result.local_dir / WEIGHTS).read_bytes() == (
        tmp_path / "src-onnx" / WEIGHTS
    ).read_bytes()
    refetched = {r.file for r in _downloads(hub)}
    assert WEIGHTS in refetched
    assert not refetched & {"LICENSE", "README.md", f"{ONNX_CPU_INT4_SUBFOLDER}/model.onnx"}


def test_locally_damaged_file_is_detected_and_refetched(onnx_repo) -> None:
    hub, _ = onnx_repo
    result = _fetch(hub)
    target = result.local_dir / WEIGHTS
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data[:-10]))  # truncated and altered
    hub.clear_requests()
    again = _fetch(hub)
    assert again.manifest_digest == result.manifest_digest
    assert len(_downloads(hub)) == 1


def test_gated_repo_without_token_says_how_to_get_access(local_hub, tmp_path: Path) -> None:
    local_hub.add_repo(ONNX_REPO, _onnx_layout(tmp_path / "g"), gated=True)
    with pytest.raises(HubAccessDeniedError, match="HF_TOKEN"):
        _fetch(local_hub)


def test_gated_repo_with_token_works_and_token_is_never_logged(
    local_hub, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    token = "hf_secretTOKEN123456789"
    local_hub.allow_token(token)
    local_hub.add_repo(ONNX_REPO, _onnx_layout(tmp_path / "g"), gated=True)
    caplog.set_level(logging.DEBUG)
    result = _fetch(local_hub, token=token)
    assert result.file_count == 6
    out, err = capfd.readouterr()
    assert token not in caplog.text + out + err
    assert token not in (result.local_dir / MANIFEST_NAME).read_text()
    assert token not in result.model_dump_json()


def test_bad_token_is_reported_as_access_denied(local_hub, tmp_path: Path) -> None:
    local_hub.add_repo(ONNX_REPO, _onnx_layout(tmp_path / "g"), gated=True)
    with pytest.raises(HubAccessDeniedError):
        _fetch(local_hub, token="hf_wrong")


def test_unknown_repo(local_hub) -> None:
    with pytest.raises(RepoNotFoundError, match="org/name"):
        _fetch(local_hub, "acme/does-not-exist")


def test_unknown_revision(onnx_repo) -> None:
    hub, _ = onnx_repo
    with pytest.raises(RevisionNotFoundError, match="no-such-branch"):
        _fetch(hub, revision="no-such-branch")


def test_file_vanishing_between_listing_and_download(onnx_repo) -> None:
    hub, _ = onnx_repo
    hub.inject("not_found", count=10, path=f"*{WEIGHTS}")
    with pytest.raises(RemoteFileNotFoundError):
        _fetch(hub)


@pytest.mark.parametrize(
    ("repo_id", "revision", "match"),
    [("no-slash", "main", "org/name"), ("a/b/c", "main", "org/name"), (ONNX_REPO, " ", "revision")],
)
def test_malformed_inputs(local_hub, repo_id: str, revision: str, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        _fetch(local_hub, repo_id, revision=revision)
    assert local_hub.requests == []


def test_not_enough_disk_space(onnx_repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    hub, _ = onnx_repo
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        "tasks.hub.download.shutil.disk_usage", lambda _p: usage._replace(free=1024 * 1024)
    )
    root = tmp_path / "snapshots"
    with pytest.raises(InsufficientDiskSpaceError, match="PHI3OPS_DATA_DIR"):
        _fetch(hub, target_root=root)
    assert _downloads(hub) == []
    assert not any(p.is_file() for p in root.rglob("*")) if root.exists() else True


# --- offline ----------------------------------------------------------------------------------


def test_offline_with_warm_cache_works(onnx_repo, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, sha = onnx_repo
    online = _fetch(hub)
    hub.clear_requests()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = _fetch(hub)
    assert hub.requests == []
    assert offline.commit_sha == sha
    assert offline.manifest_digest == online.manifest_digest
    assert _fetch(hub, revision=sha).local_dir == online.local_dir


def test_offline_with_cold_cache_names_make_demo(onnx_repo, monkeypatch) -> None:
    hub, _ = onnx_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="make demo") as info:
        _fetch(hub)
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_unreachable_hub_falls_back_to_cache(onnx_repo) -> None:
    hub, sha = onnx_repo
    _fetch(hub)
    dead = "http://127.0.0.1:9"
    assert fetch_snapshot(ONNX_REPO, endpoint=dead).commit_sha == sha
    with pytest.raises(HubUnreachableError, match="make demo"):
        fetch_snapshot(ONNX_REPO, revision="v2", endpoint=dead)


def test_token_from_env_is_used(local_hub, tmp_path: Path, monkeypatch) -> None:
    from tasks.hub import resolve_hf_token

    monkeypatch.setenv("HF_TOKEN", "hf_fromenv")
    assert resolve_hf_token() == "hf_fromenv"
    monkeypatch.setenv("HF_TOKEN", "")
    assert resolve_hf_token() is None
    assert os.environ["HF_TOKEN"] == ""
