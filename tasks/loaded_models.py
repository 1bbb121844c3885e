"""One model in memory at a time: what a stage loaded is released before the next stage loads.

A loaded pyfunc outlives the code that used it in two ways, and at Phi-3-mini's size each one
is a second copy of the weights in memory (measured on the bench preset: a lifecycle's
evaluation held two loaded models, 1,093 MB peak instead of 848 MB):

* MLflow keeps the last *models-from-code* object in a module global
  (``mlflow.models.model.__mlflow_model__``, set by ``mlflow.models.set_model`` when a logged
  entry file runs) and never clears it. Packaging loads the model it logs to predict the input
  example, so that copy stayed loaded after packaging returned.
* The ONNX pyfunc's batcher thread holds its model until it has been idle for a few seconds,
  and the model and its batcher refer to each other: once nothing else holds them, only the
  cycle collector frees them, whenever it next runs a full collection.

`release` drops MLflow's reference, closes the model (the ONNX pyfunc's ``close`` ends its
batcher thread at once) and remembers it by a weak reference only; `settle`, called before a
model is loaded, runs the cycle collector until every released model is gone (bounded: a model
without ``close`` may hold a thread a few seconds more).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "forget_models_from_code",
    "release",
    "released_alive",
    "releasing_models_from_code",
    "settle",
]

logger = logging.getLogger(__name__)

#: How long `settle` waits for released models to go: the ONNX pyfunc's batcher thread ends
#: after 5 s with nothing to do (`phi3_chat.batcher`), then the collector frees the model.
SETTLE_TIMEOUT_S = 15.0
_POLL_S = 0.25

# Released models, by weak reference only: an entry disappears when its model is freed.
_released: weakref.WeakSet[Any] = weakref.WeakSet()


def _models_from_code() -> Any | None:
    from mlflow.models import model as mlflow_model

    return getattr(mlflow_model, "__mlflow_model__", None)


def forget_models_from_code() -> Any | None:
    """Clears MLflow's reference to the last models-from-code object; returns what it held."""
    from mlflow.models import model as mlflow_model

    held = getattr(mlflow_model, "__mlflow_model__", None)
    mlflow_model.__mlflow_model__ = None
    return held


@contextmanager
def releasing_models_from_code() -> Iterator[None]:
    """Releases the models-from-code object MLflow loads inside the block (packaging: the model
    it loads to predict the input example), and nothing it held before.
    """
    before = _models_from_code()
    try:
        yield
    finally:
        held = _models_from_code()
        if held is not None and held is not before:
            release()


def release(model: Any | None = None) -> None:
    """Lets ``model`` go: MLflow's reference is dropped, a model with ``close`` (the ONNX
    pyfunc) is closed, so its batcher thread ends now, and `settle` waits for it to be freed.
    Only for a model nobody calls any more: a closed ONNX pyfunc refuses every call.

    Args:
        model: A loaded pyfunc (its python model is what is tracked) or a python model; None:
            the object MLflow's models-from-code global holds (what packaging loaded).
    """
    held = forget_models_from_code()
    target = held if model is None else _python_model(model)
    if target is None:
        return
    close = getattr(target, "close", None)  # the ONNX pyfunc: its batcher thread ends now
    if callable(close):
        try:
            close()
        except Exception:  # releasing must not fail the stage that is done with it
            logger.warning("Closing %s failed", type(target).__name__, exc_info=True)
    try:
        _released.add(target)
    except TypeError:  # not weak-referenceable: nothing to wait for
        logger.debug("Cannot track %r after releasing it", type(target).__name__)


def released_alive() -> list[Any]:
    """The released models still in memory (strong references: drop them after looking)."""
    return list(_released)


def settle(timeout_s: float = SETTLE_TIMEOUT_S) -> int:
    """Frees every released model before another loads: collects reference cycles, and waits
    (at most ``timeout_s``) for the batcher threads that still hold one to end.

    Returns:
        How many released models are still in memory (0 unless something else holds one).
    """
    forget_models_from_code()
    deadline = time.monotonic() + timeout_s
    gc.collect()
    threads, collected = threading.active_count(), time.monotonic()
    while len(_released) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        # A full collection costs time in a big process: run one when a thread has ended (a
        # batcher letting its model go), else once a second.
        if threading.active_count() != threads or time.monotonic() - collected >= 1.0:
            gc.collect()
            threads, collected = threading.active_count(), time.monotonic()
    left = len(_released)
    if left:
        logger.warning(
            "%d released model(s) still in memory after %.0f s: something else holds them, "
            "so the next model loads beside them",
            left,
            timeout_s,
        )
    return left


def _python_model(model: Any) -> Any:
    """The python model inside a loaded pyfunc (what holds the weights), else ``model``."""
    unwrap = getattr(model, "unwrap_python_model", None)
    if unwrap is not None:
        try:
            return unwrap()
        except Exception:  # not a python-model pyfunc (e.g. the transformers flavor)
            return model
    return model
