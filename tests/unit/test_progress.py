"""Progress where work is long, without a model or a Prefect server: the terminal bars and
when they show, the progress artifact outside a run, and the ONNX build's steps.
"""

from __future__ import annotations

import json
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from phi3ops.evalset import EvalItem, EvalSet
from phi3ops.settings import get_settings
from tasks import progress
from tasks.evaluation.generate import generate_outputs, generation_progress_key
from tasks.onnx_build import build_onnx_int4
from tasks.progress import RunProgress, bars_enabled, hub_bar_class, terminal_bar


def _progress_setting(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("PHI3OPS_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("PHI3OPS_PROGRESS", value)
    get_settings.cache_clear()


class _Tty:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_bars_show_on_a_terminal_only_and_the_setting_turns_them_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _progress_setting(monkeypatch, None)
    assert not bars_enabled()  # pytest's captured stderr is no terminal
    assert terminal_bar(total=3, desc="x").disable
    assert hub_bar_class() is None  # huggingface_hub's own bars, its own TTY check

    monkeypatch.setattr(sys, "stderr", _Tty())
    assert bars_enabled()
    assert not terminal_bar(total=3, desc="x").disable

    _progress_setting(monkeypatch, "0")
    assert not bars_enabled()
    silent = hub_bar_class()
    assert silent is not None and silent(total=10, name="huggingface_hub.x").disable


def _eval_set(n: int) -> EvalSet:
    items = [
        EvalItem.model_validate(
            {"id": f"i{i}", "prompt": f"p{i}", "expectations": {"contains": "x"}, "max_tokens": 4}
        )
        for i in range(n)
    ]
    return EvalSet(name="tiny", path=Path("/tmp/tiny.jsonl"), items=items, content_hash="h")


class _Echo:
    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "choices": [{"message": {"role": "assistant", "content": "x"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3},
            }
            for _ in rows
        ]


def test_generation_draws_items_and_tokens_per_second_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _progress_setting(monkeypatch, None)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    result = generate_outputs(_Echo(), _eval_set(5), batch_size=2, ttft_samples=0)
    assert len(result.items) == 5
    assert "Evaluating on tiny" in tty.text
    assert "5/5" in tty.text and "tokens/s" in tty.text

    quiet = _Tty()
    monkeypatch.setattr(sys, "stderr", quiet)
    _progress_setting(monkeypatch, "0")
    generate_outputs(_Echo(), _eval_set(2), batch_size=2, ttft_samples=0)
    assert quiet.text == ""


def test_the_progress_artifact_is_skipped_quietly_outside_a_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_api(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no Prefect API call outside a run")

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", no_api)
    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", no_api)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reporter = RunProgress("eval-progress-x-1", "starting").start()
        reporter.update(1, 2)
        reporter.finish()
        key = generation_progress_key("phi3-mini", "7")
        generate_outputs(_Echo(), _eval_set(3), batch_size=2, ttft_samples=0, progress_key=key)
    assert reporter.artifact_id is None
    assert key == "eval-progress-phi3-mini-7"


def test_progress_updates_once_per_percent_and_survives_an_api_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    updates: list[tuple[float, str | None]] = []
    monkeypatch.setattr(progress, "_in_prefect_run", lambda: True)
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda **kw: uuid4())

    def update(**kwargs: Any) -> None:
        updates.append((kwargs["progress"], kwargs["description"]))

    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", update)
    reporter = RunProgress("k", "start").start()
    for done in range(1, 401):
        reporter.update(done, 400)
    reporter.finish(description="all done")
    assert [p for p, _ in updates] == [float(p) for p in range(1, 101)] + [100.0]
    assert updates[-1] == (100.0, "all done")

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("API down")

    monkeypatch.setattr("prefect.artifacts.update_progress_artifact", broken)
    failing = RunProgress("k", "start").start()
    failing.update(1, 2)  # logged at DEBUG, never raised
    assert failing.artifact_id is None
    failing.finish()


# --- the ONNX build says which step it is in ----------------------------------------------------


def _phi3_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "phi3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_onnx_build_logs_each_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def create_model(name, source, output_dir, precision, ep, cache, **options):
        logging.getLogger("tasks.onnx_build").info("(builder running)")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "genai_config.json").write_text(
            json.dumps({"model": {"decoder": {"filename": "model.onnx"}}})
        )
        (out / "model.onnx").write_bytes(b"onnx")

    builder = types.ModuleType("onnxruntime_genai.models.builder")
    builder.parse_extra_options = lambda *args: {}  # type: ignore[attr-defined]
    builder.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime_genai.models.builder", builder)
    caplog.set_level(logging.INFO, logger="tasks.onnx_build")

    source = _phi3_dir(tmp_path)
    out = build_onnx_int4(source, tmp_path / "onnx")
    lines = [r.getMessage() for r in caplog.records if r.name == "tasks.onnx_build"]
    steps = [line for line in lines if line.startswith("ONNX build: step")]
    assert [s.split(" — ")[0] for s in steps] == [f"ONNX build: step {n}/4" for n in (1, 2, 3, 4)]
    assert "quantizing to int4" in steps[2]
    assert lines.index("(builder running)") == lines.index(steps[2]) + 1  # step 3 is the build
    assert lines[-1].startswith("ONNX build: done in") and str(out) in lines[-1]

    caplog.clear()
    build_onnx_int4(source, out)  # complete already: reused
    assert any("already holds a complete build" in r.getMessage() for r in caplog.records)
