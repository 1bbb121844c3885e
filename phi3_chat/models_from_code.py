"""The models-from-code entry MLflow logs as ``python_model``: it sets an `OnnxChatModel`.

Inside a logged model this file sits at the model's root and the package at ``code/phi3_chat/``
(logged through ``code_paths``); MLflow puts ``code/`` first on ``sys.path``, then runs this
file. In a fresh process that simply imports the logged copy under its own name. But a process
may hold another copy of ``phi3_chat`` already: phi3ops' server and evaluation import its
validator, and a server loads a new version of a model beside the one serving. Then this file
lends the name ``phi3_chat`` to the copy beside it while it imports it, and gives the name back
afterwards: every logged model runs the code logged with it (what its wrapper version names),
and the process keeps the copy it had. The imported modules keep working under a name that is
no longer theirs, as they import one another only at import time. While MLflow logs the model,
the copy beside this file is the package it sits in.
"""

import importlib
import sys
from pathlib import Path
from types import ModuleType

import mlflow

_PACKAGE = "phi3_chat"


def _copy_beside() -> Path | None:
    """The ``phi3_chat`` folder this file belongs with, or None (then any copy will do)."""
    here = Path(__file__).resolve().parent
    logged = here / "code" / _PACKAGE
    if (logged / "__init__.py").is_file():
        return logged
    if here.name == _PACKAGE and (here / "__init__.py").is_file():
        return here
    return None


def _in_package(name: str) -> bool:
    return name == _PACKAGE or name.startswith(f"{_PACKAGE}.")


def _model_module(folder: Path | None) -> ModuleType:
    """``phi3_chat.model`` imported from ``folder``, leaving the process's own copy in place."""
    loaded = getattr(sys.modules.get(_PACKAGE), "__file__", None)
    if folder is None or (loaded is not None and Path(loaded).resolve().parent == folder):
        return importlib.import_module(f"{_PACKAGE}.model")
    others = {name: sys.modules.pop(name) for name in list(sys.modules) if _in_package(name)}
    sys.path.insert(0, str(folder.parent))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(f"{_PACKAGE}.model")
    finally:
        sys.path.remove(str(folder.parent))
        if others:
            for name in [name for name in sys.modules if _in_package(name)]:
                del sys.modules[name]
            sys.modules.update(others)


mlflow.models.set_model(_model_module(_copy_beside()).OnnxChatModel())
