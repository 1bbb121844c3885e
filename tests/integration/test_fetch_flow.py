"""The fetch flow and CLI on the tiny Phi-3, through Prefect and the local hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi3ops.errors import IntegrityError, TransientHubError
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Variant

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _generate(model_dir: Path, prompt: str = "Hello", max_new: int = 5) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


@pytest.mark.slow
def test_fetch_flow_onnx_layout_loads_and_generates(hub_with_tiny_phi3, tiny_phi3) -> None:
    from flows.fetch import fetch_flow

    result = fetch_flow(repo_id=ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4)
    assert result.model_dir.name == "cpu-int4-rtn-block-32-acc-level-4"
    assert (result.model_dir / "genai_config.json").is_file()
    assert len(_generate(result.model_dir)) > 0


@pytest.mark.slow
def test_fetch_flow_pytorch_layout_and_onnx_build(hub_with_tiny_phi3) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.fetch import fetch_flow

    result = fetch_flow(repo_id=PYTORCH_REPO_ID, variant=Variant.PYTORCH, build_onnx=True)
    snapshot = result.local_dir
    model = AutoModelForCausalLM.from_pretrained(snapshot)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    assert model.config.model_type == "phi3"
    assert "<|assistant|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert result.model_dir != snapshot  # the ONNX build, outside the verified snapshot
    assert len(_generate(result.model_dir)) > 0


def test_build_onnx_needs_the_pytorch_variant(local_hub) -> None:
    from flows.fetch import fetch_flow
    from phi3ops.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="variant='pytorch'"):
        fetch_flow(repo_id=ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4, build_onnx=True)
    assert local_hub.requests == []


def test_task_retries_transient_errors_only(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import tasks.hub.fetch as hub_tasks  # fetch_snapshot_task looks fetch_snapshot up there

    calls: list[str] = []
    failures = iter([TransientHubError("503 from the hub"), None])

    def flaky(repo_id, **kwargs):
        calls.append(repo_id)
        failure = next(failures)
        if failure:
            raise failure
        return "fetched"

    monkeypatch.setattr(hub_tasks, "fetch_snapshot", flaky)
    fast = hub_tasks.fetch_snapshot_task.with_options(retry_delay_seconds=0)
    assert fast("o/r") == "fetched"
    assert calls == ["o/r", "o/r"]

    calls.clear()

    def corrupt(repo_id, **kwargs):
        calls.append(repo_id)
        raise IntegrityError("bad bytes")

    monkeypatch.setattr(hub_tasks, "fetch_snapshot", corrupt)
    with pytest.raises(IntegrityError):
        fast("o/r")
    assert calls == ["o/r"]  # never retried


def _cli(args: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PHI3OPS_DATA_DIR=str(tmp_path / "d"))
    env.update(extra)
    return env


@pytest.mark.slow
def test_cli_fetch_against_local_hub(hub_with_tiny_phi3, tmp_path: Path) -> None:
    env = _cli_env(tmp_path, HF_ENDPOINT=hub_with_tiny_phi3.url)
    env.pop("PHI3OPS_HF_ENDPOINT", None)  # the CLI must honour plain HF_ENDPOINT
    proc = _cli(["fetch", "--variant", "onnx-cpu-int4", "--revision", "main"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Fetched microsoft/Phi-3-mini-4k-instruct-onnx@" in proc.stdout + proc.stderr
    snapshots = tmp_path / "d" / "snapshots" / "microsoft--Phi-3-mini-4k-instruct-onnx"
    assert len(list(snapshots.iterdir())) == 1


def test_make_run_offline_fails_fast_naming_make_demo(tmp_path: Path) -> None:
    proc = _cli(["run"], _cli_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=60)
    assert proc.returncode == 2
    assert "make demo" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr
    # It failed before any orchestration started: no flow run was created.
    assert "flow run" not in (proc.stdout + proc.stderr).lower()
