"""The fetch stage treats the hub and the disk as untrusted: model data only, bounded waits,
fetches that do not share staging, cached files re-hashed rather than taken on a manifest's word.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from phi3ops.errors import HubTimeoutError, HubUnreachableError, UnsafeModelError
from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_CPU_INT4_SUBFOLDER
from tasks.hub import MANIFEST_NAME, check_snapshot, fetch_snapshot, is_transient

REPO = "acme/phi-mini-onnx"
MODEL = ONNX_CPU_INT4_SUBFOLDER
WEIGHTS = f"{MODEL}/model.onnx.data"
GENAI = {
    "model": {
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx",
        },
        "type": "phi3",
    }
}


def _repo(
    folder: Path, *, genai: dict | None = None, extra: dict[str, bytes] | None = None
) -> Path:
    files = {
        "README.md": b"# card\n",
        "LICENSE": b"MIT\n",
        f"{MODEL}/genai_config.json": json.dumps(genai or GENAI).encode(),
        f"{MODEL}/model.onnx": b"graph" * 100,
        WEIGHTS: bytes(range(256)) * 9000,  # ~2.3 MB: an LFS file
        f"{MODEL}/tokenizer.json": b'{"model": {}}',
        f"{MODEL}/tokenizer.model": b"sentencepiece",
        **(extra or {}),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _genai(**session_options: object) -> dict:
    config = json.loads(json.dumps(GENAI))
    config["model"]["decoder"]["session_options"].update(session_options)
    return config


def _downloads(hub) -> list[str]:
    return [r.file for r in hub.requests if r.method == "GET" and r.endpoint == "resolve"]


@pytest.fixture(autouse=True)
def _instant_backoff(no_backoff_sleep) -> None:
    """huggingface_hub's own retry waits are recorded, not slept."""


# --- model folders are data -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["libcustom_ops.so", "runner.exe", "libx.dylib", "weights.bin"])
def test_a_file_that_is_not_model_data_is_refused_before_any_download(
    local_hub, tmp_path: Path, name: str
) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src", extra={f"{MODEL}/{name}": b"\x7fELF"}))
    root = tmp_path / "snapshots"
    with pytest.raises(UnsafeModelError) as info:
        fetch_snapshot(REPO, endpoint=local_hub.url, target_root=root)
    assert f"{MODEL}/{name}" in str(info.value)
    assert _downloads(local_hub) == []
    assert not any(p.is_file() for p in root.rglob("*")) if root.exists() else True


@pytest.mark.parametrize(
    ("genai", "named"),
    [
        (_genai(custom_ops_library="libcustom_ops.so"), "session_options.custom_ops_library"),
        ({**GENAI, "custom_ops_library": "/tmp/x.so"}, "custom_ops_library"),
        (_genai(provider_options=[{"cuda": {}}]), "execution provider 'cuda'"),
        (_genai(enable_profiling="trace"), "session_options.enable_profiling"),
    ],
)
def test_genai_config_that_loads_code_or_another_provider_is_refused(
    local_hub, tmp_path: Path, genai: dict, named: str
) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src", genai=genai))
    root = tmp_path / "snapshots"
    with pytest.raises(UnsafeModelError) as info:
        fetch_snapshot(REPO, endpoint=local_hub.url, target_root=root)
    message = str(info.value)
    assert f"{MODEL}/genai_config.json" in message
    assert named in message
    # The config was checked first: no weights were downloaded, nothing reached the snapshot.
    assert _downloads(local_hub) == [f"{MODEL}/genai_config.json"]
    assert not any(p.is_file() for p in root.rglob("*"))


# Two session_options: Python's json keeps the last (clean) one, onnxruntime-genai applies the
# first, which loads the "weights" below (a shared library under an allowed suffix).
DUPLICATE_SESSION_OPTIONS = b"""{"model": {"type": "phi3", "decoder": {
  "filename": "model.onnx",
  "session_options": {"custom_ops_library": "evil.onnx.data"},
  "session_options": {"log_id": "onnxruntime-genai", "provider_options": []}}}}"""


def test_a_genai_config_with_two_session_options_is_refused_before_the_weights(
    local_hub, tmp_path: Path
) -> None:
    extra = {
        f"{MODEL}/genai_config.json": DUPLICATE_SESSION_OPTIONS,
        f"{MODEL}/evil.onnx.data": b"\x7fELF" + bytes(100),
    }
    local_hub.add_repo(REPO, _repo(tmp_path / "src", extra=extra))
    root = tmp_path / "snapshots"
    with pytest.raises(UnsafeModelError) as info:
        fetch_snapshot(REPO, endpoint=local_hub.url, target_root=root)
    assert f"{MODEL}/genai_config.json: key model.decoder.session_options appears more" in str(
        info.value
    )
    assert _downloads(local_hub) == [f"{MODEL}/genai_config.json"]
    assert not any(p.is_file() for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("name", "data", "named"),
    [
        ("evil.onnx.data", b"\x7fELF\x02\x01\x01" + bytes(100), "ELF"),
        ("tokenizer.json", b'{"model": {"vocab": {"a": 0, "a": 1}}}', "key model.vocab.a"),
    ],
)
def test_a_file_that_is_code_or_repeats_a_key_never_enters_the_snapshot(
    local_hub, tmp_path: Path, name: str, data: bytes, named: str
) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src", extra={f"{MODEL}/{name}": data}))
    root = tmp_path / "snapshots"
    with pytest.raises(UnsafeModelError) as info:
        fetch_snapshot(REPO, endpoint=local_hub.url, target_root=root)
    assert f"{MODEL}/{name}: " in str(info.value) and named in str(info.value)
    snapshot_copies = [p for p in root.rglob(name) if ".staging" not in p.parts]
    assert snapshot_copies == []


def test_weights_that_merely_start_with_mz_are_fetched(local_hub, tmp_path: Path) -> None:
    weights = b"MZ" + bytes(range(256)) * 9000  # no "PE" signature where 0x3C points
    local_hub.add_repo(REPO, _repo(tmp_path / "src", extra={WEIGHTS: weights}))
    result = fetch_snapshot(REPO, endpoint=local_hub.url)
    assert (result.local_dir / WEIGHTS).read_bytes() == weights


def test_python_files_are_left_out(local_hub, tmp_path: Path) -> None:
    extra = {f"{MODEL}/configuration_phi3.py": b"import os\nos.system('id')\n"}
    local_hub.add_repo(REPO, _repo(tmp_path / "src", extra=extra))
    result = fetch_snapshot(REPO, endpoint=local_hub.url)
    assert not list(result.local_dir.rglob("*.py"))
    assert (result.model_dir / "genai_config.json").is_file()
    assert f"{MODEL}/configuration_phi3.py" not in _downloads(local_hub)


# --- bounded waits ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "method", "after_bytes"),
    [
        ("/api/models/*/revision/*", None, None),  # model_info: huggingface_hub sets no timeout
        ("/api/models/*/tree/*", None, None),  # list_repo_tree: no timeout, 5 retries on one
        (WEIGHTS, "HEAD", None),  # file metadata: retried with 60 s, 5 times
        (WEIGHTS, "GET", None),  # file body: 5 resumes
        (WEIGHTS, "GET", 100_000),  # a download that stalls halfway: 5 resumes too
    ],
)
def test_a_silent_hub_fails_in_bounded_time_naming_the_endpoint(
    local_hub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    method: str | None,
    after_bytes: int | None,
) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src"))
    monkeypatch.setenv("PHI3OPS_HUB_TIMEOUT_S", "0.5")
    get_settings.cache_clear()
    local_hub.inject("silent", count=100, path=path, method=method, after_bytes=after_bytes)
    started = time.monotonic()
    with pytest.raises(HubTimeoutError) as info:
        fetch_snapshot(REPO, endpoint=local_hub.url)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"a silent hub took {elapsed:.1f} s to fail"
    assert local_hub.url in str(info.value)
    assert "PHI3OPS_HUB_TIMEOUT_S" in str(info.value)
    assert not is_transient(info.value)  # the fetch task does not multiply the wait
    assert [r.fault for r in local_hub.requests].count("silent") == 1  # asked once, not retried


# --- staging, and cached files ----------------------------------------------------------------


def test_concurrent_fetches_of_one_commit_both_succeed(local_hub, tmp_path: Path) -> None:
    src = _repo(tmp_path / "src")
    local_hub.add_repo(REPO, src)
    root = tmp_path / "snapshots"
    start = threading.Barrier(4)
    results: list = []
    errors: list[BaseException] = []

    def fetch() -> None:
        start.wait()
        try:
            results.append(fetch_snapshot(REPO, endpoint=local_hub.url, target_root=root))
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len({r.manifest_digest for r in results}) == 1 and len(results) == 4
    snapshot = results[0].local_dir
    assert (snapshot / WEIGHTS).read_bytes() == (src / WEIGHTS).read_bytes()
    assert json.loads((snapshot / MANIFEST_NAME).read_text())["manifest_digest"] == (
        results[0].manifest_digest
    )
    assert list((root / ".staging").iterdir()) == []  # each fetch removed its own staging
    assert [p.name for p in snapshot.parent.iterdir()] == [snapshot.name]  # no temp manifests


def test_a_corrupted_cached_file_is_downloaded_again(local_hub, tmp_path: Path) -> None:
    src = _repo(tmp_path / "src")
    local_hub.add_repo(REPO, src)
    first = fetch_snapshot(REPO, endpoint=local_hub.url)
    cached = first.local_dir / WEIGHTS
    data = bytearray(cached.read_bytes())
    data[1000] ^= 0xFF  # same size: only a hash tells
    cached.write_bytes(bytes(data))
    local_hub.clear_requests()

    again = fetch_snapshot(REPO, endpoint=local_hub.url)
    assert _downloads(local_hub) == [WEIGHTS]
    assert again.downloaded_bytes == len(data)
    assert cached.read_bytes() == (src / WEIGHTS).read_bytes()
    assert again.manifest_digest == first.manifest_digest


def test_offline_a_corrupted_cached_file_is_refused(
    local_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src"))
    first = fetch_snapshot(REPO, endpoint=local_hub.url)
    cached = first.local_dir / WEIGHTS
    data = bytearray(cached.read_bytes())
    data[0] ^= 0xFF
    cached.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="damaged") as info:
        fetch_snapshot(REPO, endpoint=local_hub.url)
    assert WEIGHTS in str(info.value)


def test_a_refetch_removes_what_was_added_to_the_snapshot(local_hub, tmp_path: Path) -> None:
    local_hub.add_repo(REPO, _repo(tmp_path / "src"))
    first = fetch_snapshot(REPO, endpoint=local_hub.url)
    (first.model_dir / "libcustom_ops.so").write_bytes(b"\x7fELF")
    (first.local_dir / "extra" / "deeper").mkdir(parents=True)
    (first.local_dir / "extra" / "deeper" / "notes.json").write_text("{}")

    again = fetch_snapshot(REPO, endpoint=local_hub.url)
    assert not (again.model_dir / "libcustom_ops.so").exists()
    assert not (again.local_dir / "extra").exists()
    assert again.downloaded_bytes == 0
    check_snapshot(again)  # exactly what the manifest lists
