"""An evaluation run's Datasets in the MLflow UI: the eval set, once, named and in context
``evaluation``; not a second, unexplained ``dataset`` that ``mlflow.genai.evaluate`` would log
for data it cannot trace to a dataset. Scored on canned answers of a weightless version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3ops.evalset import open_eval_set
from phi3ops.registry import ModelTarget
from tasks.evaluation import Generation, ItemGeneration, score_generation
from tasks.evaluation.score import DATASET_DIGEST_LENGTH

NAME = "phi3-datasets"


@pytest.fixture
def target(isolated_settings: Path) -> ModelTarget:
    """Version 1 of NAME, registered without weights (scoring never loads it)."""
    from mlflow import MlflowClient

    from phi3ops.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    client.create_registered_model(NAME)
    client.create_model_version(NAME, source=str(isolated_settings / "weights"))
    return ModelTarget(model_name=NAME, version="1", model_uri=f"models:/{NAME}/1", flavor="onnx")


def test_an_evaluation_run_has_one_dataset_the_eval_set(target: ModelTarget) -> None:
    import mlflow

    eval_set = open_eval_set("smoke")
    generation = Generation(
        items=[
            ItemGeneration(id=item.id, content="Paris", latency_s=0.1, batch_size=1)
            for item in eval_set.items
        ],
        wall_s=1.0,
    )
    summary = score_generation(target, eval_set, generation)

    run = mlflow.get_run(summary.run_id)
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
        ("smoke", eval_set.content_hash[:DATASET_DIGEST_LENGTH])
    ]
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "evaluation")]
    # Scoring itself is unchanged: a trace and a verdict per item.
    traces = mlflow.search_traces(
        locations=[run.info.experiment_id], run_id=summary.run_id, return_type="list"
    )
    assert len(traces) == len(eval_set.items)
    assert summary.metrics["n_items"] == len(eval_set.items)
