"""The local hub, driven by the real huggingface_hub client (no model, no network)."""

from __future__ import annotations

import gc
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import close_session, disable_progress_bars

from offline.local_hub import LocalHub, use_hf_endpoint

REPO = "org/tiny"
WEIGHTS = "model.safetensors"
WEIGHTS_SIZE = 2 * 1024 * 1024


@pytest.fixture(autouse=True)
def hf_quiet(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    disable_progress_bars()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    close_session()  # no pooled keep-alive connection outlives the test's server


@pytest.fixture
def sleeps(no_backoff_sleep: list[float]) -> list[float]:
    """Backoff sleeps of huggingface_hub, recorded instead of slept (keeps retry tests fast)."""
    return no_backoff_sleep


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "repo"
    (folder / "sub" / "dir").mkdir(parents=True)
    config = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (folder / "README.md").write_text("# tiny\n")
    (folder / "sub" / "dir" / "file.txt").write_text("nested\n")
    (folder / WEIGHTS).write_bytes(random.Random(0).randbytes(WEIGHTS_SIZE))
    return folder


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with LocalHub() as local_hub:
        yield local_hub


@pytest.fixture
def sha(hub: LocalHub, repo_dir: Path) -> str:
    return hub.add_repo(REPO, repo_dir, tags=["v1"])


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


def _raw(
    hub: LocalHub, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def _download(
    hub: LocalHub, revision: str, dest: Path, filename: str = WEIGHTS, **kw: object
) -> Path:
    path = hf_hub_download(
        REPO, filename, revision=revision, local_dir=dest, endpoint=hub.url, token=False, **kw
    )
    return Path(path)


def _resolve_gets(hub: LocalHub) -> list[str | None]:
    return [r.file for r in hub.requests if r.endpoint == "resolve" and r.method == "GET"]


# -- lifecycle -----------------------------------------------------------------------------------


def test_starts_listening_and_closes_without_leaks(repo_dir: Path, tmp_path: Path) -> None:
    hub = LocalHub()
    socket.create_connection(("127.0.0.1", hub.port), timeout=5).close()  # listening on return
    assert hub.url == f"http://127.0.0.1:{hub.port}"
    sha = hub.add_repo(REPO, repo_dir)
    _download(hub, sha, tmp_path / "out", filename="config.json")  # leaves a keep-alive open
    storage = hub._storage
    assert any(t.name.startswith("local-hub") for t in threading.enumerate())

    # The open keep-alive connection (idle timeout 300 s) is closed, not waited for: a close
    # that only joined its thread would leave it running past the join's 5 s.
    hub.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("local-hub")]
    assert not storage.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", hub.port), timeout=1).close()
    hub.close()  # idempotent


def test_forgotten_hub_is_shut_down_when_collected(repo_dir: Path) -> None:
    hub = LocalHub()
    hub.add_repo(REPO, repo_dir)
    port, storage = hub.port, hub._storage
    del hub
    gc.collect()
    assert not [t.name for t in threading.enumerate() if t.name == f"local-hub-{port}"]
    assert not storage.exists()


# -- metadata ------------------------------------------------------------------------------------


def test_model_info_returns_sha_and_siblings(hub: LocalHub, sha: str, repo_dir: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info(REPO, files_metadata=True)
    assert info.id == REPO
    assert info.sha == sha
    assert len(sha) == 40
    assert info.gated is False
    assert info.config == {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(_files(repo_dir))
    weights = (repo_dir / WEIGHTS).read_bytes()
    assert siblings[WEIGHTS].size == WEIGHTS_SIZE
    assert siblings[WEIGHTS].lfs is not None
    assert siblings[WEIGHTS].lfs.sha256 == _sha256(weights)
    assert siblings["README.md"].lfs is None
    assert siblings["README.md"].blob_id == _git_blob_oid(b"# tiny\n")
    assert api.model_info(REPO, revision=sha).sha == sha
    assert api.model_info(REPO, revision="v1").sha == sha
    assert api.model_info(REPO, revision=sha[:10]).sha == sha
    assert huggingface_hub.HfApi(endpoint=hub.url).resolve_revision(REPO).resolved == sha


def test_list_repo_tree_matches_files(hub: LocalHub, sha: str, repo_dir: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    entries = list(api.list_repo_tree(REPO, recursive=True, revision=sha))
    files = {e.path: e for e in entries if isinstance(e, RepoFile)}
    folders = {e.path for e in entries if isinstance(e, RepoFolder)}
    assert folders == {"sub", "sub/dir"}
    assert set(files) == set(_files(repo_dir))
    for path, data in _files(repo_dir).items():
        entry = files[path]
        assert entry.size == len(data)
        if path == WEIGHTS:
            assert entry.lfs is not None
            assert entry.lfs.sha256 == _sha256(data)
            assert entry.lfs.size == len(data)
            # As on the hub: the git blob is the LFS pointer file.
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{_sha256(data)}\n"
            pointer += f"size {len(data)}\n"
            assert entry.lfs.pointer_size == len(pointer)
            assert entry.blob_id == _git_blob_oid(pointer.encode())
        else:
            assert entry.lfs is None
            assert entry.blob_id == _git_blob_oid(data)
        assert entry.xet_hash is None  # never the xet path

    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {"sub", "config.json", "tokenizer_config.json", "README.md", WEIGHTS}
    assert [e.path for e in api.list_repo_tree(REPO, "sub/dir")] == ["sub/dir/file.txt"]
    expanded = list(api.list_repo_tree(REPO, expand=True))
    assert all(e.last_commit is not None and e.last_commit.oid == sha for e in expanded)
    assert set(api.list_repo_files(REPO)) == set(_files(repo_dir))


def test_tree_pages_follow_link_header(repo_dir: Path) -> None:
    with LocalHub(page_size=2) as hub:
        sha = hub.add_repo(REPO, repo_dir)
        entries = list(HfApi(endpoint=hub.url, token=False).list_repo_tree(REPO, recursive=True))
        assert len(entries) == 7  # 5 files + 2 folders
        tree_calls = [r for r in hub.requests if r.endpoint == "tree"]
        assert len(tree_calls) == 4
        assert all(r.revision == sha for r in tree_calls[1:])  # next pages pinned to the sha


def test_lfs_threshold_and_paths_info(repo_dir: Path) -> None:
    with LocalHub(lfs_threshold=10) as hub:
        hub.add_repo(REPO, repo_dir)
        api = HfApi(endpoint=hub.url, token=False)
        infos = {e.path: e for e in api.get_paths_info(REPO, ["config.json", "sub", "missing"])}
        assert set(infos) == {"config.json", "sub"}
        config = infos["config.json"]
        assert isinstance(config, RepoFile)
        assert config.lfs is not None  # over the 10-byte threshold
        assert isinstance(infos["sub"], RepoFolder)


# -- downloads -----------------------------------------------------------------------------------


def test_hf_hub_download_pinned_sha(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    for path, data in _files(repo_dir).items():
        assert _download(hub, sha, dest, filename=path).read_bytes() == data

    hub.clear_requests()
    _download(hub, sha, dest)  # pinned and on disk: no request at all
    assert hub.requests == []
    _download(hub, "main", dest)  # a branch: one HEAD to check the etag, no body
    assert [(r.method, r.endpoint) for r in hub.requests] == [("HEAD", "resolve")]


def test_hf_hub_download_to_cache_uses_etags(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    for name in (WEIGHTS, "README.md"):
        path = hf_hub_download(REPO, name, cache_dir=cache, endpoint=hub.url, token=False)
        assert Path(path).read_bytes() == (repo_dir / name).read_bytes()
        assert f"/snapshots/{sha}/" in path
    blobs = {p.name for p in (cache / "models--org--tiny" / "blobs").iterdir()}
    files = hub.files(REPO)
    assert blobs == {files[WEIGHTS].sha256, files["README.md"].git_oid}


def test_snapshot_download_with_allow_patterns(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path
) -> None:
    folder = snapshot_download(
        REPO,
        revision=sha,
        local_dir=tmp_path / "snap",
        allow_patterns=["*.json"],
        endpoint=hub.url,
        token=False,
    )
    assert _files(Path(folder)) == {
        "config.json": (repo_dir / "config.json").read_bytes(),
        "tokenizer_config.json": (repo_dir / "tokenizer_config.json").read_bytes(),
    }
    assert sorted(_resolve_gets(hub)) == ["config.json", "tokenizer_config.json"]

    full = snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token=False)
    assert _files(Path(full)) == _files(repo_dir)


def test_new_commit_moves_branch_old_sha_stays(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path
) -> None:
    (repo_dir / "README.md").write_text("# tiny v2\n")
    sha2 = hub.add_repo(REPO, repo_dir)
    assert sha2 != sha
    assert hub.add_repo("org/other", repo_dir) != sha2  # the parent is part of the sha
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info(REPO).sha == sha2
    assert api.model_info(REPO, revision="v1").sha == sha  # tags do not move
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [sha2, sha]
    refs = api.list_repo_refs(REPO)
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", sha2)}
    assert {(t.name, t.target_commit) for t in refs.tags} == {("v1", sha)}
    # The first commit was copied: editing the folder did not change what it serves.
    assert _download(hub, sha, tmp_path / "a", filename="README.md").read_text() == "# tiny\n"
    assert _download(hub, "main", tmp_path / "b", filename="README.md").read_text() == "# tiny v2\n"
    with pytest.raises(ValueError, match="tags do not move"):
        hub.add_repo(REPO, repo_dir / "sub", tags=["v1"])


def test_same_tree_and_parent_give_same_sha(repo_dir: Path) -> None:
    with LocalHub() as first, LocalHub() as second:
        assert first.add_repo(REPO, repo_dir) == second.add_repo("a/b", repo_dir)


def test_url_encoded_revision(hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path) -> None:
    (repo_dir / "README.md").write_text("# pr\n")
    pr_sha = hub.add_repo(REPO, repo_dir, branch="refs/pr/1")
    path = _download(hub, "refs/pr/1", tmp_path / "pr", filename="README.md")
    assert path.read_text() == "# pr\n"
    assert [r.revision for r in hub.requests if r.endpoint == "resolve"] == ["refs/pr/1"] * 2
    assert "refs%2Fpr%2F1" not in str([r.path for r in hub.requests])  # paths are decoded
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info(REPO, revision="refs/pr/1").sha == pr_sha
    assert len(list(api.list_repo_tree(REPO, revision="refs/pr/1", recursive=True))) == 7
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [p.name for p in refs.pull_requests or []] == ["refs/pr/1"]


def test_range_requests(hub: LocalHub, sha: str, repo_dir: Path) -> None:
    data = (repo_dir / WEIGHTS).read_bytes()
    url = f"/{REPO}/resolve/{sha}/{WEIGHTS}"

    status, headers, body = _raw(hub, "GET", url, {"Range": "bytes=100-199"})
    assert (status, body) == (206, data[100:200])
    assert headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert headers["content-length"] == "100"

    status, headers, body = _raw(hub, "GET", url, {"Range": f"bytes={len(data) - 10}-"})
    assert (status, body) == (206, data[-10:])
    status, _, body = _raw(hub, "GET", url, {"Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, _, body = _raw(hub, "GET", url, {"Range": f"bytes=10-{len(data) + 99}"})
    assert (status, body) == (206, data[10:])
    status, headers, _ = _raw(hub, "GET", url, {"Range": f"bytes={len(data)}-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(data)}"
    status, _, body = _raw(hub, "GET", url, {"Range": "bytes=0-1,5-6"})  # multipart: ignored
    assert (status, body) == (200, data)
    assert [r.range for r in hub.requests][:2] == ["bytes=100-199", f"bytes={len(data) - 10}-"]


def test_head_headers_match_what_huggingface_hub_reads(hub: LocalHub, sha: str) -> None:
    files = hub.files(REPO)
    status, headers, body = _raw(hub, "HEAD", f"/{REPO}/resolve/main/{WEIGHTS}")
    assert (status, body) == (200, b"")
    assert headers["x-repo-commit"] == sha
    assert headers["etag"] == f'"{files[WEIGHTS].sha256}"'
    assert headers["x-linked-etag"] == f'"{files[WEIGHTS].sha256}"'
    assert headers["x-linked-size"] == headers["content-length"] == str(WEIGHTS_SIZE)
    assert headers["accept-ranges"] == "bytes"
    assert not [name for name in headers if name.startswith("x-xet")]

    _, headers, _ = _raw(hub, "HEAD", f"/{REPO}/resolve/main/README.md")
    assert headers["etag"] == f'"{files["README.md"].git_oid}"'
    assert "x-linked-etag" not in headers

    metadata = huggingface_hub.get_hf_file_metadata(
        huggingface_hub.hf_hub_url(REPO, WEIGHTS, endpoint=hub.url), token=False
    )
    assert (metadata.commit_hash, metadata.etag, metadata.size) == (
        sha,
        files[WEIGHTS].sha256,
        WEIGHTS_SIZE,
    )
    assert metadata.xet_file_data is None


# -- errors --------------------------------------------------------------------------------------


def test_unknown_repo_revision_file_raise_hub_errors(
    hub: LocalHub, sha: str, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "x", local_dir=tmp_path, endpoint=hub.url, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "nope", tmp_path)
    with pytest.raises(RevisionNotFoundError):
        list(api.list_repo_tree(REPO, revision="0" * 40))
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub, sha, tmp_path, filename="missing.bin")
    assert not api.file_exists(REPO, "missing.bin")
    assert api.file_exists(REPO, "sub/dir/file.txt")
    assert not api.revision_exists(REPO, "nope")


def test_gated_repo_needs_an_allowed_token(hub: LocalHub, repo_dir: Path, tmp_path: Path) -> None:
    sha = hub.add_repo(REPO, repo_dir, gated=True)
    hub.add_repo("org/other", repo_dir, gated=True)
    hub.allow_token("hf_good")
    hub.allow_token("hf_other_only", repos=["org/other"])
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info(REPO).gated == "manual"  # metadata stays public, as on the hub

    with pytest.raises(GatedRepoError) as missing:
        _download(hub, sha, tmp_path / "a")
    assert missing.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as not_listed:
        hf_hub_download(
            REPO, WEIGHTS, local_dir=tmp_path / "b", endpoint=hub.url, token="hf_other_only"
        )
    assert not_listed.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as invalid:
        hf_hub_download(REPO, WEIGHTS, local_dir=tmp_path / "c", endpoint=hub.url, token="hf_bad")
    assert invalid.value.response.status_code == 401
    assert not isinstance(invalid.value, RepositoryNotFoundError)

    path = hf_hub_download(
        REPO, WEIGHTS, local_dir=tmp_path / "d", endpoint=hub.url, token="hf_good"
    )
    assert Path(path).read_bytes() == (repo_dir / WEIGHTS).read_bytes()
    assert any(r.authorized for r in hub.requests)
    assert "hf_good" not in repr(hub.requests)


# -- faults --------------------------------------------------------------------------------------


def test_rate_limited_get_is_retried(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path, sleeps: list[float]
) -> None:
    hub.inject("rate_limit", count=2, path=WEIGHTS, method="GET")
    assert _download(hub, sha, tmp_path).read_bytes() == (repo_dir / WEIGHTS).read_bytes()
    assert [r.status for r in hub.requests if r.method == "GET"] == [429, 429, 200]
    assert sleeps == [1.0, 1.0]  # Retry-After: 0, plus huggingface_hub's own second
    assert hub.pending_faults == []


def test_server_error_on_get_is_not_retried(
    hub: LocalHub, sha: str, tmp_path: Path, sleeps: list[float]
) -> None:
    hub.inject("server_error", path=WEIGHTS, method="GET", status=502)
    with pytest.raises(HfHubHTTPError) as error:
        _download(hub, sha, tmp_path)
    assert error.value.response.status_code == 502
    assert [r.status for r in hub.requests if r.method == "GET"] == [502]
    assert not list(tmp_path.glob("*.safetensors"))
    assert _download(hub, sha, tmp_path).stat().st_size == WEIGHTS_SIZE  # fault consumed


def test_server_error_on_head_is_retried(
    hub: LocalHub, sha: str, tmp_path: Path, sleeps: list[float]
) -> None:
    hub.inject("server_error", count=2, path=WEIGHTS, method="HEAD")
    assert _download(hub, sha, tmp_path).stat().st_size == WEIGHTS_SIZE
    assert [r.status for r in hub.requests if r.method == "HEAD"] == [500, 500, 200]
    assert sleeps == [1]  # second HEAD try goes through http_backoff


def test_api_retries_differ_by_call(hub: LocalHub, sha: str, sleeps: list[float]) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    hub.inject("server_error", path="/api/models/*/revision/*", status=503)
    with pytest.raises(HfHubHTTPError):
        api.model_info(REPO, revision="main")  # plain GET: no retry
    assert api.model_info(REPO, revision="main").sha == sha

    hub.inject("server_error", count=2, path="/api/models/*/tree/*")
    hub.inject("rate_limit", path="/api/models/*/tree/*")
    assert len(list(api.list_repo_tree(REPO, recursive=True))) == 7  # http_backoff retries
    assert [r.status for r in hub.requests if r.endpoint == "tree"] == [500, 500, 429, 200]
    assert sleeps == [1, 2, 1.0]


def test_dropped_connection_is_resumed(
    hub: LocalHub,
    sha: str,
    repo_dir: Path,
    tmp_path: Path,
    sleeps: list[float],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = (repo_dir / WEIGHTS).read_bytes()
    # Cut mid-body: huggingface_hub reads 10 MiB chunks, so with nothing written yet it restarts.
    hub.inject("drop_connection", path=WEIGHTS)
    assert _download(hub, sha, tmp_path / "a").read_bytes() == data
    gets = [(r.status, r.range, r.fault) for r in hub.requests if r.method == "GET"]
    assert gets == [(200, None, "drop_connection"), (200, None, None)]

    # With smaller read chunks the received half is on disk: it resumes with a Range request.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.clear_requests()
    hub.inject("drop_connection", path=WEIGHTS, after_bytes=WEIGHTS_SIZE // 2)
    assert _download(hub, sha, tmp_path / "b").read_bytes() == data
    gets = [(r.status, r.range) for r in hub.requests if r.method == "GET"]
    assert gets == [(200, None), (206, f"bytes={WEIGHTS_SIZE // 2}-")]
    assert sleeps == [1, 1]


def test_reset_connection_and_dropped_head_raise(
    hub: LocalHub, sha: str, tmp_path: Path, sleeps: list[float]
) -> None:
    hub.inject("reset_connection", path=WEIGHTS)
    with pytest.raises(httpx2.ReadError):  # not among the errors http_get resumes on
        _download(hub, sha, tmp_path)
    hub.inject("drop_connection", path=WEIGHTS, method="HEAD")
    with pytest.raises(httpx2.RemoteProtocolError):
        _download(hub, sha, tmp_path)
    assert [r.status for r in hub.requests if r.fault] == [200, 0]
    assert not list(tmp_path.glob("*.safetensors"))


def test_corrupt_serves_same_length_other_bytes(
    hub: LocalHub, sha: str, repo_dir: Path, tmp_path: Path
) -> None:
    hub.inject("corrupt", path="*.safetensors")
    got = _download(hub, sha, tmp_path).read_bytes()  # huggingface_hub checks the size only
    assert len(got) == WEIGHTS_SIZE
    assert _sha256(got) != hub.files(REPO)[WEIGHTS].sha256
    hub.inject("corrupt")
    status, _, body = _raw(hub, "GET", f"/{REPO}/resolve/{sha}/README.md", {"Range": "bytes=2-3"})
    assert status == 206
    assert body == bytes(255 - b for b in b"# tiny\n"[2:4])


def test_fault_modes_map_to_hub_errors(hub: LocalHub, sha: str, tmp_path: Path) -> None:
    hub.inject("not_found", path="config.json")
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub, sha, tmp_path, filename="config.json")
    hub.inject("unauthorized")
    with pytest.raises(GatedRepoError):
        _download(hub, sha, tmp_path, filename="config.json")
    hub.inject("forbidden", path="/api/models/*")
    with pytest.raises(GatedRepoError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    hub.inject("not_found", path="/api/models/*")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert _download(hub, sha, tmp_path, filename="config.json").is_file()


def test_silent_reads_the_request_and_never_answers(hub: LocalHub, sha: str) -> None:
    hub.inject("silent", path="/api/models/*")
    started = time.monotonic()
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.get(f"{hub.url}/api/models/{REPO}", timeout=0.5)
    assert time.monotonic() - started < 5
    assert [(r.endpoint, r.status, r.fault) for r in hub.requests] == [("model_info", 0, "silent")]
    assert HfApi(endpoint=hub.url, token=False).model_info(REPO).sha == sha  # one request only
    # With after_bytes: the headers and the first bytes of the body, then nothing.
    hub.inject("silent", path=WEIGHTS, after_bytes=1000)
    url = f"{hub.url}/{REPO}/resolve/{sha}/{WEIGHTS}"
    received = bytearray()

    def read_until_it_stalls() -> None:
        with httpx2.stream("GET", url, timeout=0.5) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received.extend(chunk)

    with pytest.raises(httpx2.ReadTimeout):
        read_until_it_stalls()
    assert len(received) == 1000
    hub.clear_requests()
    # A client still waiting does not keep the hub from closing.
    hub.inject("silent")
    waiting = socket.create_connection(("127.0.0.1", hub.port))
    waiting.sendall(f"GET /api/models/{REPO} HTTP/1.1\r\nHost: hub\r\n\r\n".encode())
    time.sleep(0.2)
    started = time.monotonic()
    hub.close()
    assert time.monotonic() - started < 3
    waiting.settimeout(5)
    assert waiting.recv(1) == b""  # closed without a byte of answer
    waiting.close()


def test_faults_are_scoped_counted_and_clearable(hub: LocalHub, sha: str) -> None:
    hub.inject("server_error", count=2, path="config.json")
    readme = f"/{REPO}/resolve/{sha}/README.md"
    config = f"/{REPO}/resolve/{sha}/config.json"
    assert _raw(hub, "GET", readme)[0] == 200
    assert [_raw(hub, "GET", config)[0] for _ in range(3)] == [500, 500, 200]
    assert hub.pending_faults == []
    hub.inject("rate_limit", count=5)
    assert hub.pending_faults == [("rate_limit", 5)]
    status, headers, _ = _raw(hub, "GET", config)
    assert (status, headers["retry-after"]) == (429, "0")
    hub.clear_faults()
    assert _raw(hub, "GET", config)[0] == 200
    with pytest.raises(ValueError, match="Unknown fault"):
        hub.inject("explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status is only for server_error"):
        hub.inject("rate_limit", status=500)
    with pytest.raises(ValueError, match="count must be >= 1"):
        hub.inject("server_error", count=0)


# -- repos ---------------------------------------------------------------------------------------


def test_add_repo_validates(hub: LocalHub, repo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid repo id"):
        hub.add_repo("bad repo", repo_dir)
    with pytest.raises(ValueError, match="Invalid branch or tag name"):
        hub.add_repo(REPO, repo_dir, branch="a..b")
    with pytest.raises(NotADirectoryError):
        hub.add_repo(REPO, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no file"):
        hub.add_repo(REPO, tmp_path / "empty")
    with pytest.raises(LookupError):
        hub.resolve("org/missing")


def test_serving_in_place_refuses_changed_files(hub: LocalHub, repo_dir: Path) -> None:
    sha = hub.add_repo(REPO, repo_dir, copy=False)
    url = f"/{REPO}/resolve/{sha}/README.md"
    assert _raw(hub, "GET", url)[2] == b"# tiny\n"
    (repo_dir / "README.md").write_text("# changed, longer\n")
    status, headers, _ = _raw(hub, "GET", url)
    assert status == 500
    assert "changed on disk" in headers["x-error-message"]


def test_skips_git_and_hf_local_dir_metadata(hub: LocalHub, repo_dir: Path) -> None:
    (repo_dir / ".git").mkdir()
    (repo_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo_dir / ".cache" / "huggingface").mkdir(parents=True)
    (repo_dir / ".cache" / "huggingface" / "x.metadata").write_text("x")
    (repo_dir / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    hub.add_repo(REPO, repo_dir)
    assert set(hub.files(REPO)) == set(_files(repo_dir)) - {".git/HEAD"}


# -- pointing huggingface_hub at the hub ---------------------------------------------------------


def test_use_hf_endpoint_patches_and_restores(hub: LocalHub, sha: str, tmp_path: Path) -> None:
    before = (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        os.environ.get("HF_ENDPOINT"),
    )
    with use_hf_endpoint(hub.url):
        assert huggingface_hub.model_info(REPO, token=False).sha == sha  # module-level HfApi
        path = hf_hub_download(REPO, "README.md", cache_dir=tmp_path, token=False)  # no endpoint=
        assert Path(path).read_text() == "# tiny\n"
        assert os.environ["HF_ENDPOINT"] == hub.url
    assert (
        constants.ENDPOINT,
        constants.HUGGINGFACE_CO_URL_TEMPLATE,
        os.environ.get("HF_ENDPOINT"),
    ) == before


def test_cli_serves_until_interrupted(repo_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "offline.local_hub", "--repo", f"{REPO}={repo_dir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        assert line.startswith("HF_ENDPOINT=http://127.0.0.1:")
        endpoint = line.split("=", 1)[1]
        # A subprocess only needs HF_ENDPOINT in its environment.
        child_env = {**env, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(tmp_path / "cache")}
        child_env.pop("HF_HUB_OFFLINE", None)
        code = (
            "import huggingface_hub as h; print(h.model_info('org/tiny', token=False).sha);"
            "print(open(h.hf_hub_download('org/tiny', 'README.md', token=False)).read())"
        )
        child = subprocess.run(
            [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=60
        )
        assert child.returncode == 0, child.stderr
        sha, readme = child.stdout.split("\n", 1)
        assert len(sha) == 40
        assert readme.startswith("# tiny")
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=10)
    assert server.returncode == 0, stderr
    assert f"{REPO}@main = {sha}" in stderr
