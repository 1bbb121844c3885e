"""Phi-3 (ONNX int4) chat model on onnxruntime-genai, served as an MLflow pyfunc.

This package is logged with every ONNX model phi3ops packages and runs wherever the model is
loaded, so it imports only the standard library, numpy, pandas, mlflow and
``onnxruntime_genai``: never Prefect, never phi3ops. A logged model then loads anywhere its
pip requirements install.

Why a package logged through ``code_paths``: MLflow's *models-from-code* logs exactly one file
(``python_model=``), and the served model has five concerns that do not fit one short module.
So the one file MLflow logs is the tiny entry `phi3_chat.models_from_code`, and the package
travels beside it as ``code_paths``: inside a logged model it is ``code/phi3_chat/``, and MLflow
puts ``code/`` first on ``sys.path`` before it runs the entry, so the entry imports the package
under its own name. A process that already imported another copy of ``phi3_chat`` (phi3ops'
server, evaluation) still runs each model on the copy logged with it: the entry imports that
copy and gives the name back to the one that was there (see the entry's docstring).

Log it with::

    mlflow.pyfunc.log_model(
        name="phi-3-mini-4k-instruct-onnx-int4",  # the name MLflow's UI lists it under
        python_model="<path of phi3_chat/models_from_code.py>",
        code_paths=["<path of the phi3_chat folder>"],
        artifacts={"model_dir": "<folder holding genai_config.json>"},
        model_config={"model_name": "microsoft/Phi-3-mini-4k-instruct-onnx"},  # optional
        signature=..., input_example=..., pip_requirements=[...],
    )

The modules, one concern each:

* `phi3_chat.folder`: what a model folder may hold (it is data, never code); the fetch and
  package tasks run the same check on what they take in.
* `phi3_chat.validate`: every request field, row and ``params`` checked before any token is
  generated (also the serving layer's validator, for both flavors).
* `phi3_chat.request`: sampling, a validated request, incremental decoding and a row's state.
* `phi3_chat.batcher`: concurrent calls share one onnxruntime-genai batch.
* `phi3_chat.steps`: one batch, step by step (grammar, per-row sampling, logprobs).
* `phi3_chat.guidance`: ``response_format`` checked and turned into a grammar.
* `phi3_chat.tools`: tools rendered into the prompt, the answer's grammar, its calls read back.
* `phi3_chat.sampler`: each row samples on its own (``seed``); the model's own logprobs.
* `phi3_chat.answers`: a finished row as a ``chat.completion``, a running one as its chunks.
* `phi3_chat.model`: the pyfunc, `OnnxChatModel`.
* `phi3_chat.models_from_code`: the entry MLflow logs as ``python_model``.

Models logged before this package existed carry their own single file
(``onnx_chat_model.py``, no ``code/`` folder) and keep loading with it.
"""
