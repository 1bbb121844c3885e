"""Versions logged before the served model became a package still load and serve.

``tests/fixtures/onnx-pyfunc-v1`` is the tiny Phi-3 as ``log_onnx_model`` logged it when the
served model was one models-from-code file (``onnx_chat_model.py``, no ``code/`` folder; see
``tests/fixtures/README.md``). A copy of it is loaded as MLflow loads any model, then registered
and served by phi3ops' own serving app, the way ``phi3ops serve`` serves a registered version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "onnx-pyfunc-v1"
NAME = "phi3-logged-before-the-package"


def chat(content: str, **fields: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], **fields}


@pytest.fixture
def old_model(tmp_path: Path) -> Path:
    """A copy of the old-format model folder (loading may write next to its code)."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "onnx-pyfunc-v1"))


def test_the_fixture_is_the_single_file_format(old_model: Path) -> None:
    import yaml

    pyfunc = yaml.safe_load((old_model / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(pyfunc["model_code_path"]).name == "onnx_chat_model.py"
    assert pyfunc["code"] is None
    assert not (old_model / "code").exists()


def test_an_old_format_model_loads_with_its_own_code_and_answers(old_model: Path) -> None:
    import mlflow

    loaded = mlflow.pyfunc.load_model(str(old_model))
    model = loaded.unwrap_python_model()
    # Its own logged file, imported as MLflow imports a models-from-code file: not phi3_chat.
    assert type(model).__module__.startswith("code_model_")
    code_file = Path(type(model).load_context.__globals__["__file__"]).resolve()
    assert code_file == (old_model / "onnx_chat_model.py").resolve()

    [completion] = loaded.predict(chat("What is the capital of France?", max_tokens=6))
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "microsoft/Phi-3-mini-4k-instruct-onnx"
    assert completion["usage"]["completion_tokens"] == 6
    assert completion["choices"][0]["finish_reason"] == "length"
    [text] = loaded.predict({"prompt": "Say hello.", "max_tokens": 4})
    assert isinstance(text, str)
    chunks = list(loaded.predict_stream(chat("Hi", max_tokens=3)))
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_an_old_format_version_registers_and_serves(old_model: Path, tmp_path: Path) -> None:
    import mlflow
    from starlette.testclient import TestClient

    from phi3ops.serving.app import build_app
    from phi3ops.serving.follow import download_model
    from phi3ops.serving.openai_routes import ServedModel
    from phi3ops.tracking import configure_tracking

    experiment_id = configure_tracking()
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifacts(str(old_model), artifact_path="model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", NAME).version
    uri = f"models:/{NAME}/{version}"

    path = download_model(uri, tmp_path / "served")
    app = build_app(path, served=ServedModel.of(name=NAME, version=str(version), uri=uri))
    with TestClient(app) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": f"{NAME}/{version}", **chat("Name a colour.", max_tokens=5)},
        )
        assert response.status_code == 200, response.text
        completion = response.json()
        assert completion["model"] == f"{NAME}/{version}"
        assert completion["usage"]["completion_tokens"] == 5

        response = client.post("/invocations", json={"inputs": [{"prompt": "Hi", "max_tokens": 3}]})
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["predictions"][0], str)

        # Its code predates structured outputs: asked for one on either route, it refuses
        # (MLflow's schema check would drop the field and answer free text without a word).
        json_object = {"type": "json_object"}
        for route, body in (
            ("/v1/chat/completions", chat("Hi", max_tokens=3) | {"response_format": json_object}),
            (
                "/invocations",
                {"inputs": [chat("Hi", max_tokens=3) | {"seed": 7, "temperature": 1}]},
            ),
        ):
            response = client.post(route, json=body)
            assert response.status_code == 400, (route, response.text)
            assert "not supported by the model version served here" in response.text, route
        assert (
            client.post(  # a greedy seed asks nothing of the model: still answered
                "/invocations", json={"inputs": [chat("Hi", max_tokens=3) | {"seed": 7}]}
            ).status_code
            == 200
        )
