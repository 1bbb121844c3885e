"""The ASGI app behind `phi3ops serve`, assembled: the model, MLflow's scoring app, the serving
middleware, and the operations layer in front of it.

Run by uvicorn as ``phi3ops.serving.app:create_app`` (``--factory``); the model folder comes
from ``PHI3OPS_SERVE_MODEL_PATH``, the registered name and version that records are tagged with
from ``PHI3OPS_SERVE_MODEL_NAME`` / ``PHI3OPS_SERVE_MODEL_VERSION``, the URI it was asked for from
``PHI3OPS_SERVE_MODEL_URI`` (all set by `start_server`), the API key, if any, from
``PHI3OPS_SERVE_API_KEY`` (`phi3ops.serving.auth`). When that URI names an alias, the app
follows it (`phi3ops.serving.follow`): each call is answered, validated and recorded by the
version serving when it started, whichever the alias names by the time it ends.

`create_app` returns at once: the operations layer (`phi3ops.serving.operations`: ``/health``,
``/ready``, ``/metrics``, API keys) answers while the model loads in the background
(`serving_app`). `build_app` is the serving middleware alone, loaded now (`phi3ops.serving.
middleware.ServingMiddleware`: validation, routes, records), for tests and tools that run it
in-process.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.serving.auth import ApiKeyGuard, take_api_key
from phi3ops.serving.follow import AliasFollower, LoadedModel, ModelSwitcher, alias_of
from phi3ops.serving.metrics import ServingMetrics
from phi3ops.serving.middleware import ServingMiddleware as ServingMiddleware
from phi3ops.serving.model_folder import TransformersContextLimit, context_tokens, read_mlmodel
from phi3ops.serving.openai_routes import ServedModel
from phi3ops.serving.operations import OperationsApp
from phi3ops.serving.records import InferenceRecorder, write_entries
from phi3ops.serving.spool import RecordSpool
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking, tracking_uri

MODEL_PATH_ENV = "PHI3OPS_SERVE_MODEL_PATH"
MODEL_NAME_ENV = "PHI3OPS_SERVE_MODEL_NAME"
MODEL_VERSION_ENV = "PHI3OPS_SERVE_MODEL_VERSION"
MODEL_URI_ENV = "PHI3OPS_SERVE_MODEL_URI"
#: The folder `start_server` downloads into; versions the server switches to go there too.
DOWNLOAD_DIR_ENV = "PHI3OPS_SERVE_DOWNLOAD_DIR"
#: The setting with the seconds between looks at the alias served (`Settings.serve_poll_s`).
POLL_ENV = "PHI3OPS_SERVE_POLL_S"


def load_model(
    model_path: Path,
    *,
    served: ServedModel,
    version: str | None = None,
    recorder: InferenceRecorder | None = None,
) -> LoadedModel:
    """Loads the model at ``model_path`` with what answers with it: MLflow's scoring app (the
    one ``mlflow models serve`` runs) and, for the transformers flavor, its context check
    (tokenizer loaded now, not by the first request).

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        served: How the OpenAI routes name the model.
        version: Its registry version, if it is one.
        recorder: Where its requests are recorded; None records nothing.
    """
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(str(model_path))
    limit = None
    transformers = "transformers" in read_mlmodel(model_path).get("flavors", {})
    if transformers:
        limit = TransformersContextLimit(model_path)
        _ = limit.tokenizer
    return LoadedModel(
        app=scoring_server.init(model),
        model=model,
        served=served,
        version=version,
        limit=limit,
        recorder=recorder,
        streams=not transformers,  # MLflow's transformers pyfunc has no predict_stream
    )


def build_app(
    model_path: Path,
    *,
    recorder: InferenceRecorder | None = None,
    served: ServedModel | None = None,
    follow: Callable[[ModelSwitcher], AliasFollower] | None = None,
    metrics: ServingMetrics | None = None,
) -> ServingMiddleware:
    """MLflow's scoring app for the model at ``model_path``, guarded, recording when given one.

    Args:
        model_path: A downloaded MLflow model folder (either flavor).
        recorder: Where each request row is recorded; None records nothing.
        served: How the OpenAI routes name the model; None names it by nothing but ``model``.
        follow: Makes the follower that moves the served model with its alias; None serves
            this one model.
        metrics: Where its calls are counted for ``/metrics``; None counts nothing.

    Returns:
        The ASGI app: `ServingMiddleware` before MLflow's scoring app. Both time requests
        out after ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds (60 by default).
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    first = load_model(
        model_path,
        served=served or ServedModel.of(name=None, version=None, uri=None),
        version=recorder.model_version if recorder is not None else None,
        recorder=recorder,
    )
    models = ModelSwitcher(first)
    settings = get_settings()
    return ServingMiddleware(
        models,
        max_body_bytes=settings.serve_max_body_bytes,
        max_rows=settings.serve_max_rows,
        timeout_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
        follower=follow(models) if follow is not None else None,
        metrics=metrics,
    )


def recorder_for(
    model_path: Path, *, model_name: str, model_version: str, spool: RecordSpool | None = None
) -> InferenceRecorder:
    """A recorder writing to the inference experiment of the project's tracking store, through
    ``spool``, else this process's spool under ``<data dir>/serving/spool`` (started here: it
    first stores any records a killed server left behind).
    """
    settings = get_settings()
    experiment_id = configure_tracking(settings.inference_experiment_name)
    if spool is None:
        spool = RecordSpool(
            settings.data_dir / "serving" / "spool",
            functools.partial(write_entries, tracking_uri=tracking_uri()),
        ).start()
    return InferenceRecorder(
        model_name=model_name,
        model_version=model_version,
        experiment_id=experiment_id,
        record_prompts=settings.record_prompts,
        context_tokens=context_tokens(model_path),
        spool=spool,
        model_id=read_mlmodel(model_path).get("model_id"),
    )


def create_app() -> OperationsApp:
    """The served app: `OperationsApp` (probes, metrics, the API key handed over in
    ``PHI3OPS_SERVE_API_KEY``), loading `serving_app` in the background once uvicorn starts.
    """
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    settings = get_settings()
    key = take_api_key()
    guard = ApiKeyGuard(key, open_paths=settings.serve_open_paths) if key else None
    return OperationsApp(
        serving_app,
        guard=guard,
        drain_delay_s=settings.serve_drain_delay_s,
        load_wait_s=float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()),
    )


def serving_app(metrics: ServingMetrics | None = None) -> ServingMiddleware:
    """The serving app for ``$PHI3OPS_SERVE_MODEL_PATH``, loaded now; it records when the served
    version is known, and follows the alias of ``$PHI3OPS_SERVE_MODEL_URI`` every
    ``PHI3OPS_SERVE_POLL_S`` seconds when it names one.
    """
    model_path = Path(os.environ[MODEL_PATH_ENV])
    name, version = os.environ.get(MODEL_NAME_ENV), os.environ.get(MODEL_VERSION_ENV)
    uri = os.environ.get(MODEL_URI_ENV)
    if not (name and version):
        served = ServedModel.of(name=None, version=None, uri=uri)
        return build_app(model_path, served=served, metrics=metrics)
    recorder = recorder_for(model_path, model_name=name, model_version=version)
    settings = get_settings()
    followed = alias_of(uri)
    follow = None
    if followed is not None and followed[0] == name and settings.serve_poll_s > 0:
        _log_like_uvicorn()

        def load(new_version: str, path: Path) -> LoadedModel:
            new_recorder = recorder_for(
                path, model_name=name, model_version=new_version, spool=recorder.spool
            )
            served = ServedModel.of(name=name, version=new_version, uri=uri)
            return load_model(path, served=served, version=new_version, recorder=new_recorder)

        def follow(models: ModelSwitcher) -> AliasFollower:
            return AliasFollower(
                models,
                model_name=name,
                alias=followed[1],
                load=load,
                download_dir=Path(
                    os.environ.get(DOWNLOAD_DIR_ENV) or settings.data_dir / "serving"
                ),
                poll_s=settings.serve_poll_s,
                # Serving the champion, a traffic plan may give the candidate live traffic.
                candidate_alias=CANDIDATE_ALIAS if followed[1] == CHAMPION_ALIAS else None,
            )

    served = ServedModel.of(name=name, version=version, uri=uri)
    return build_app(model_path, recorder=recorder, served=served, follow=follow, metrics=metrics)


def _log_like_uvicorn() -> None:
    """Writes the serving layer's news (a switch, a version that failed to load) to the
    server's log as uvicorn writes its own (its handlers are set before the app is made).
    """
    ours, uvicorn = logging.getLogger("phi3ops.serving"), logging.getLogger("uvicorn")
    if uvicorn.handlers and not ours.handlers:
        for handler in uvicorn.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
