"""docs/settings.md is the reference `phi3ops.settings` renders, and names every setting."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from phi3ops.settings import OTHER_VARIABLES, settings_reference

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "settings.md"
REGENERATE = "`make docs` (or `.venv/bin/python -m phi3ops.settings > docs/settings.md`)"
#: Where the project's code lives (phi3_chat/, the served model's package, once it exists).
CODE_DIRS = ("phi3ops", "phi3_chat", "tasks", "flows", "cli", "deployments", "bench", "offline")
#: Variables phi3ops sets for its own child processes or tests, not for users.
INTERNAL = {
    "PHI3OPS_CRASH_AT",  # tests: die at a named point (phi3ops/crash.py)
    "PHI3OPS_SERVE_MODEL_PATH",  # `phi3ops serve` -> its uvicorn workers
    "PHI3OPS_SERVE_MODEL_NAME",
    "PHI3OPS_SERVE_MODEL_VERSION",
    "PHI3OPS_SERVE_MODEL_URI",
    "PHI3OPS_SERVE_DOWNLOAD_DIR",
}


def test_docs_settings_md_is_what_the_code_renders() -> None:
    assert REFERENCE.is_file(), f"docs/settings.md is missing: create it with {REGENERATE}."
    written = REFERENCE.read_text(encoding="utf-8")
    rendered = settings_reference()
    if written != rendered:
        diff = "".join(
            list(
                difflib.unified_diff(
                    written.splitlines(keepends=True),
                    rendered.splitlines(keepends=True),
                    "docs/settings.md",
                    "rendered from phi3ops/settings.py",
                )
            )[:40]
        )
        pytest.fail(
            f"docs/settings.md is out of date with the settings in the code: regenerate it with "
            f"{REGENERATE} and commit it.\n{diff}"
        )


def test_reference_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = settings_reference()
    monkeypatch.setenv("PHI3OPS_DATA_DIR", "/somewhere/else")
    monkeypatch.setenv("PHI3OPS_GATE_MIN_PASS_RATE", "0.99")
    monkeypatch.setenv("PHI3OPS_SERVE_MAX_ROWS", "3")
    assert settings_reference() == plain


@pytest.mark.parametrize(("name", "where"), [(name, where) for name, where, _ in OTHER_VARIABLES])
def test_variables_read_outside_settings_are_still_read_there(name: str, where: str) -> None:
    assert name in (REPO / where).read_text(encoding="utf-8"), (
        f"{name} is no longer read in {where}: update OTHER_VARIABLES in phi3ops/settings.py "
        f"and run {REGENERATE}."
    )


def test_every_phi3ops_variable_in_the_code_is_documented() -> None:
    documented = set(re.findall(r"`(PHI3OPS_[A-Z0-9_]+)`", settings_reference()))
    found: dict[str, str] = {}
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for name in re.findall(r"[\"'](PHI3OPS_[A-Z0-9_]*[A-Z0-9])[\"']", text):
                found.setdefault(name, str(path.relative_to(REPO)))
    missing = {
        name: where
        for name, where in found.items()
        if name not in documented and name not in INTERNAL
    }
    assert not missing, (
        f"Read in the code but not in docs/settings.md: {missing}. Make it a field of Settings, "
        f"or add it to OTHER_VARIABLES in phi3ops/settings.py, then run {REGENERATE}."
    )
