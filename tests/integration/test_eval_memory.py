"""One model in memory at a time across packaging and evaluation, on the tiny Phi-3.

Packaging loads the model it logs (MLflow predicts the input example), and MLflow keeps that
object in a module global; the ONNX pyfunc's batcher thread and the model refer to each other.
Without releasing, the evaluation's model loaded beside the packaging's (measured on the bench
preset: 1,093 MB peak instead of 848 MB). Here: packaging drops MLflow's reference and closes
the model (its batcher thread ends), the next load waits until released models are freed, and
the evaluation releases its own model when done.
"""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from phi3ops.evalset import EvalSet, load_eval_set, open_eval_set
from phi3ops.registry import resolve_model
from phi3ops.sources import ONNX_REPO_ID, Variant
from tasks.evaluation.generate import generate_for, generate_outputs
from tasks.evaluation.resolve import load_model
from tasks.hub import fetch_snapshot
from tasks.loaded_models import release, released_alive, settle
from tasks.packaging import log_onnx_model
from tasks.registry import register_version


def _loaded_onnx_models() -> list[Any]:
    """OnnxChatModel objects in memory that hold a loaded onnxruntime-genai model."""
    gc.collect()
    return [
        obj
        for obj in gc.get_objects()
        if type(obj).__name__ == "OnnxChatModel" and hasattr(obj, "_model")
    ]


def _new_models(earlier: weakref.WeakSet[Any]) -> int:
    """Loaded models that were not in memory before the test (other tests' may come and go)."""
    return sum(model not in earlier for model in _loaded_onnx_models())


def _batcher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "onnx-chat-batcher"}


def _eval_set(tmp_path: Path, n: int) -> EvalSet:
    lines = [
        json.dumps(
            {
                "id": f"q{i}",
                "prompt": f"Question {i}?",
                "expectations": {"contains": "x"},
                "tags": ["factual"],
                "max_tokens": 4,
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "ten.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_eval_set(path)


def test_packaging_and_evaluation_leave_no_model_behind(hub_with_tiny_phi3, tmp_path: Path) -> None:
    from mlflow.models import model as mlflow_model

    settle()  # whatever an earlier test released is gone before counting
    earlier: weakref.WeakSet[Any] = weakref.WeakSet(_loaded_onnx_models())
    threads_before = _batcher_threads()
    fetched = fetch_snapshot(
        ONNX_REPO_ID, variant=Variant.ONNX_CPU_INT4, endpoint=hub_with_tiny_phi3.url
    )
    logged = log_onnx_model(fetched)

    # MLflow loaded the model to predict the input example; packaging let go of it (closed:
    # its batcher thread ended), so once collected nothing of it is left
    assert mlflow_model.__mlflow_model__ is None
    assert settle() == 0
    assert _new_models(earlier) == 0
    target = resolve_model(register_version(logged, fetched, model_name="mem").model_uri)

    # waits for the packaging's model to be freed, then loads it with the eval's batch size
    model = load_model(target, batch_size=10)
    assert mlflow_model.__mlflow_model__ is None  # the caller holds the only reference
    assert _new_models(earlier) == 1
    # ten rows of one call run as one onnxruntime-genai batch: past the packaged max_batch_size
    ten = _eval_set(tmp_path, 10)
    generated = generate_outputs(model, ten, batch_size=10, ttft_samples=0)
    assert {item.batch_size for item in generated.items} == {10}
    assert model.unwrap_python_model().load_stats()["last_batch_size"] == 10
    release(model)  # whoever loads a model releases it
    del model

    generation = generate_for(target, open_eval_set("smoke"), ttft_samples=1)
    assert not [item.error for item in generation.items if item.error]
    assert settle() == 0  # the evaluation released (closed) its model: it is freed
    assert not released_alive()
    assert _new_models(earlier) == 0
    assert _batcher_threads() <= threads_before


@pytest.fixture(autouse=True)
def _tracking(isolated_settings) -> None:
    from phi3ops.tracking import configure_tracking

    configure_tracking()
