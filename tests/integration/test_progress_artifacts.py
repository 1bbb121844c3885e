"""Progress where work is long, read back through the Prefect API as the UI shows it: the
evaluation's progress artifact reaches 100 %, and a fetch's per-file lines (files downloaded
side by side) are in the flow run's logs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from phi3ops.sources import ONNX_REPO_ID
from tests.artifacts import latest_artifact, run_logs

pytestmark = pytest.mark.usefixtures("prefect_harness")

MODEL_NAME = "phi3-progress"


@pytest.mark.slow
def test_evaluation_progress_artifact_reaches_100_percent(
    tiny_phi3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefect.artifacts
    from huggingface_hub.utils import close_session

    from flows.evaluate import evaluate_flow
    from offline.local_hub import LocalHub
    from phi3ops.settings import get_settings
    from phi3ops.sources import Flavor, Variant
    from tasks.evaluation.generate import generation_progress_key
    from tasks.hub import fetch_snapshot
    from tasks.packaging import log_model
    from tasks.registry import register_version

    eval_set = tmp_path / "three.jsonl"
    eval_set.write_text(
        "".join(
            f'{{"id": "q{i}", "prompt": "Say {i}.", "expectations": {{"max_chars": 400}},'
            f' "max_tokens": 4}}\n'
            for i in range(3)
        )
    )
    monkeypatch.setenv("PHI3OPS_EVAL_BATCH_SIZE", "1")
    monkeypatch.setenv("PHI3OPS_EVAL_TTFT_SAMPLES", "0")
    get_settings.cache_clear()
    with LocalHub() as hub:
        hub.add_repo(ONNX_REPO_ID, tiny_phi3.onnx_dir)
        fetched = fetch_snapshot(ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4, endpoint=hub.url)
    close_session()
    version = register_version(
        log_model(fetched, flavor=Flavor.ONNX), fetched, model_name=MODEL_NAME
    ).version

    sent: list[float] = []
    real_update = prefect.artifacts.update_progress_artifact

    def recording_update(**kwargs: Any) -> Any:
        sent.append(kwargs["progress"])
        return real_update(**kwargs)

    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", recording_update)
    summary = evaluate_flow(model_uri=f"models:/{MODEL_NAME}/{version}", eval_set=str(eval_set))

    assert summary.metrics["n_items"] == 3
    artifact = latest_artifact(generation_progress_key(MODEL_NAME, str(version)))
    assert artifact.type == "progress"
    assert float(artifact.data) == 100.0
    assert "3/3 items" in artifact.description and "tokens/s" in artifact.description
    assert artifact.flow_run_id is not None and artifact.task_run_id is not None
    assert sent == [33.0, 66.0, 100.0]  # one step per batch of one item, up to 100


@pytest.mark.slow
def test_fetch_per_file_lines_reach_the_flowrun_logs(hub_with_tiny_phi3) -> None:
    from prefect.settings import PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.fetch import fetch_flow

    # tests/conftest.py turns run logs off for the whole session; this test is about them.
    with temporary_settings({PREFECT_LOGGING_TO_API_ENABLED: True}):
        state = fetch_flow(return_state=True)
        snapshot = state.result()
        n = snapshot.file_count
        deadline = time.monotonic() + 30
        while True:
            files = [
                line
                for line in run_logs(state.state_details.flow_run_id)
                if line.startswith("tasks.hub.fetch INFO Fetched ") and ": file " in line
            ]
            if len(files) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert n > 1
    # One line per file, counted as each landed (in whatever order the threads finished).
    ends = sorted(line.rsplit(": ", 1)[1] for line in files)
    assert ends == sorted(f"file {k} of {n}" for k in range(1, n + 1)), files
