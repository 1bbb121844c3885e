"""The pure pieces of the evaluation stage: batching, generation over a fake model, scorers,
comparison and parity reports (no model, no Prefect; the MLflow store is not touched).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED

from phi3ops.errors import InvalidInputError
from phi3ops.evalset import EvalItem, EvalSet, hash_items
from phi3ops.names import evaluation_artifact_key
from phi3ops.policies import GatePolicy
from phi3ops.registry import resolve_model
from phi3ops.serving.signatures import ONNX_CHAT_SIGNATURE
from tasks.evaluation import (
    ChampionLookup,
    EvalSummary,
    comparison_markdown,
    comparison_rows,
    completion_text,
    expectation_scorers,
    generate_outputs,
    judge_scorers,
    parity_report,
    plan_batches,
)
from tasks.evaluation.generate import (
    MIN_DEADLINE_S,
    evaluation_deadline_s,
    failure_of,
    generation_line,
)

HASH = "a" * 64
OTHER_HASH = "b" * 64


def _item(item_id: str, prompt: str, *, max_tokens: int | None = None, **expectations: Any):
    return EvalItem.model_validate(
        {
            "id": item_id,
            "prompt": prompt,
            "expectations": expectations or {"contains": "x"},
            "tags": ["t"],
            **({"max_tokens": max_tokens} if max_tokens else {}),
        }
    )


def _set(*items: EvalItem) -> EvalSet:
    return EvalSet(name="fake", path="/tmp/fake.jsonl", items=list(items), content_hash="h")


def _completion(text: str, tokens: int = 3) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }


class FakeModel:
    """Answers each request with its prompt upper-cased; a batch holding "poison" raises."""

    def __init__(self, *, stream: bool = True, shape: str = "list") -> None:
        self.calls: list[int] = []
        self.stream = stream
        self.shape = shape

    def predict(self, rows: list[dict[str, Any]]) -> Any:
        self.calls.append(len(rows))
        prompts = [row["messages"][-1]["content"] for row in rows]
        if any("poison" in p for p in prompts):
            raise ValueError("poisoned batch")
        answers = [
            _completion(p.upper(), tokens=row["max_tokens"])
            for p, row in zip(prompts, rows, strict=True)
        ]
        if self.shape == "dict" and len(answers) == 1:
            return answers[0]
        if self.shape == "str":
            return [p.upper() for p in prompts]
        return answers

    def predict_stream(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not self.stream:
            raise AttributeError("predict_stream")

        def chunks() -> Iterator[dict[str, Any]]:
            yield {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
            yield {"choices": [{"delta": {"content": "A"}}]}
            yield {"choices": [{"delta": {"content": "B"}}]}

        return chunks()


# --- batching and generation ------------------------------------------------------------------


def test_batches_group_equal_generation_fields_and_respect_the_size() -> None:
    items = [
        _item("a", "a", max_tokens=8),
        _item("b", "b"),
        _item("c", "c", max_tokens=8),
        _item("d", "d"),
        _item("e", "e"),
        _item("f", "f", max_tokens=8),
    ]
    # b, d, e use the default (16); a, c, f set 8: never in one call with the others.
    assert plan_batches(items, default_max_tokens=16, batch_size=2) == [[0, 2], [5], [1, 3], [4]]
    assert plan_batches(items, default_max_tokens=8, batch_size=8) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(InvalidInputError, match="batch_size"):
        plan_batches(items, default_max_tokens=8, batch_size=0)


def test_a_failing_call_is_split_in_halves_not_retried_row_by_row() -> None:
    items = [_item(i, p) for i, p in [("a", "hi"), ("b", "poison me"), ("c", "yo"), ("d", "ok")]]
    model = FakeModel()
    result = generate_outputs(
        model, _set(*items), batch_size=3, default_max_tokens=4, ttft_samples=2
    )
    by_id = {r.id: r for r in result.items}
    assert [r.id for r in result.items] == ["a", "b", "c", "d"]
    # warm-up (1 row), the failing call of 3, its halves [a, b] (fails again) and [c], then
    # [a] and [b] alone, then the last batch of 1
    assert model.calls == [1, 3, 2, 1, 1, 1, 1]
    assert by_id["b"].content is None and "ValueError: poisoned batch" in by_id["b"].error
    assert by_id["b"].failure == "failed"
    assert by_id["a"].content == "HI" and by_id["a"].error is None and by_id["a"].batch_size == 1
    assert by_id["c"].batch_size == 1 and by_id["c"].failure is None
    assert by_id["d"].batch_size == 1 and by_id["d"].completion_tokens == 4
    assert len(result.ttft_s) == 2 and all(t >= 0 for t in result.ttft_s)
    assert result.wall_s > 0 and result.peak_rss_mb and result.peak_rss_mb > 0
    assert result.deadline_s == MIN_DEADLINE_S  # a fake model is fast: the least deadline
    assert result.notes == []


class Admitting(FakeModel):
    """The ONNX pyfunc's contract: ``params['timeout_s']`` in its signature, refusals before
    any work (RESOURCE_EXHAUSTED) and cancellations past the timeout (DEADLINE_EXCEEDED).
    """

    def __init__(self, *, most_rows: int, slow: str = "") -> None:
        super().__init__()
        self.most_rows, self.slow = most_rows, slow
        self.timeouts: list[float] = []
        self.metadata = Model(signature=ONNX_CHAT_SIGNATURE)

    def predict(self, rows: list[dict[str, Any]], params: dict[str, Any] | None = None) -> Any:
        self.timeouts.append(params["timeout_s"])
        if len(rows) > self.most_rows:
            self.calls.append(len(rows))
            raise MlflowException("would not finish in time", error_code=RESOURCE_EXHAUSTED)
        if any(self.slow and self.slow in row["messages"][-1]["content"] for row in rows):
            self.calls.append(len(rows))
            raise MlflowException("cancelled past its timeout", error_code=DEADLINE_EXCEEDED)
        return super().predict(rows)


def test_calls_get_the_evaluations_deadline_and_failures_are_counted_once() -> None:
    items = [_item(f"i{n}", "slow" if n == 5 else f"p{n}") for n in range(8)]
    model = Admitting(most_rows=2, slow="slow")
    result = generate_outputs(
        model, _set(*items), batch_size=4, default_max_tokens=4, ttft_samples=0, timeout_s=900
    )
    # every call carries the time left to the evaluation's own deadline, not a 60 s default
    assert result.deadline_s == 900
    assert all(0 < timeout <= 900 for timeout in model.timeouts)
    assert model.timeouts[1] > 800
    # refused calls of 4 are split in halves (a refusal costs no work); the call holding the
    # item that timed out is not retried: its two rows are errors, each counted once
    assert model.calls == [1, 4, 2, 2, 4, 2, 2]
    failures = {r.id: r.failure for r in result.items if r.failure}
    assert failures == {"i4": "timed_out", "i5": "timed_out"}
    assert all(r.content == r.id.replace("i", "P") for r in result.items if not r.failure)
    line = generation_line("fake", result)
    assert "8 items of fake" in line and "0 refused, 2 timed out, 0 failed" in line


def test_a_row_refused_alone_is_refused_and_a_passed_deadline_sends_nothing() -> None:
    items = [_item("a", "a"), _item("b", "b")]
    refused = generate_outputs(
        Admitting(most_rows=0), _set(*items), batch_size=2, ttft_samples=0, timeout_s=900
    )
    assert [r.failure for r in refused.items] == ["refused", "refused"]
    assert all("would not finish in time" in (r.error or "") for r in refused.items)
    model = Admitting(most_rows=8)
    late = generate_outputs(model, _set(*items), batch_size=2, ttft_samples=0, timeout_s=1e-9)
    assert model.calls == [1]  # the warm-up only: past the deadline nothing is sent
    assert [r.failure for r in late.items] == ["timed_out", "timed_out"]
    assert "deadline had passed" in (late.items[0].error or "")


def test_the_deadline_covers_the_work_at_the_measured_speed() -> None:
    requests = [{"max_tokens": 100}, {"max_tokens": 300}]
    # 400 tokens at 2 s each, twice over: one row at a time, no batching gain assumed
    assert evaluation_deadline_s(requests, 2.0, timeout_s=None) == 2 * 400 * 2.0
    assert evaluation_deadline_s(requests, 0.001, timeout_s=None) == MIN_DEADLINE_S
    assert evaluation_deadline_s(requests, None, timeout_s=None) == 2 * 400 * 2.0  # unmeasured
    assert evaluation_deadline_s(requests, 2.0, timeout_s=30) == 30
    assert failure_of(MlflowException("x", error_code=RESOURCE_EXHAUSTED)) == "refused"
    assert failure_of(MlflowException("x", error_code=DEADLINE_EXCEEDED)) == "timed_out"
    assert failure_of(ValueError("x")) == "failed"


def test_generation_takes_every_answer_shape_and_notes_a_model_that_cannot_stream() -> None:
    items = [_item("a", "hi"), _item("b", "yo")]
    for shape in ("list", "dict", "str"):
        model = FakeModel(stream=False, shape=shape)
        result = generate_outputs(
            model, _set(*items), batch_size=1, default_max_tokens=4, ttft_samples=3
        )
        assert [r.content for r in result.items] == ["HI", "YO"], shape
        assert result.ttft_s == []
        assert "does not stream" in result.notes[0]
    skipped = generate_outputs(
        FakeModel(), _set(*items), batch_size=2, default_max_tokens=4, ttft_samples=0
    )
    assert skipped.ttft_s == [] and "eval_ttft_samples is 0" in skipped.notes[0]
    assert {r.batch_size for r in skipped.items} == {2}


def test_a_model_answering_the_wrong_number_of_rows_fails_those_rows() -> None:
    class Short(FakeModel):
        def predict(self, rows):
            return [_completion("x")]  # one answer, whatever was asked

    result = generate_outputs(
        Short(), _set(_item("a", "a"), _item("b", "b")), batch_size=2, ttft_samples=0
    )
    # the batch of 2 fails (1 answer), each row alone then gets its answer
    assert [r.content for r in result.items] == ["x", "x"]


def test_completion_text_reads_chat_completions_and_strings() -> None:
    assert completion_text(_completion("hey", 2)) == (
        "hey",
        {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        None,
    )
    assert completion_text("plain") == ("plain", {}, None)
    with pytest.raises(ValueError, match="unrecognised answer"):
        completion_text({"choices": []})


# --- scorers ----------------------------------------------------------------------------------


def test_expectation_scorers_pass_good_outputs_and_skip_items_without_the_kind() -> None:
    contains, max_chars = expectation_scorers(["contains", "max_chars"])
    assert (contains.name, max_chars.name) == ("contains", "max_chars")
    good = contains(
        outputs={"content": "Paris!", "error": None}, expectations={"expected_contains": ["paris"]}
    )
    assert good.value is True and "contains" in good.rationale
    bad = contains(
        outputs={"content": "Lyon", "error": None}, expectations={"expected_contains": ["Paris"]}
    )
    assert bad.value is False and "missing 'Paris'" in bad.rationale
    failed = contains(
        outputs={"content": None, "error": "boom"}, expectations={"expected_contains": ["Paris"]}
    )
    assert failed.value is False and failed.rationale == "no output: boom"
    # no such expectation on this item: no verdict at all
    assert (
        max_chars(
            outputs={"content": "x", "error": None}, expectations={"expected_contains": ["x"]}
        )
        is None
    )
    with pytest.raises(InvalidInputError, match="Unknown expectation kind"):
        expectation_scorers(["sounds_good"])


def test_llm_judges_are_off_unless_an_endpoint_is_configured(monkeypatch) -> None:
    from phi3ops.settings import get_settings

    assert get_settings().judge_endpoint is None
    assert judge_scorers() == []
    monkeypatch.setenv("PHI3OPS_JUDGE_ENDPOINT", "gateway:/judge")
    get_settings.cache_clear()
    judges = judge_scorers()  # constructing a judge calls nothing
    assert [j.name for j in judges] == ["relevance_to_query", "safety"]
    assert {j.model for j in judges} == {"gateway:/judge"}


def test_evaluation_settings_defaults() -> None:
    from phi3ops.settings import get_settings

    settings = get_settings()
    assert (settings.eval_batch_size, settings.eval_ttft_samples) == (8, 5)
    assert settings.eval_default_max_tokens == 128


# --- inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("phi3-mini", "not a registry URI"),
        ("runs:/abc/model", "not a registry URI"),
        ("models:/phi3-mini", "not a registry URI"),
        ("models:/phi3-mini/latest", "is not a number"),
        ("models:/a:b@candidate", "not valid"),
    ],
)
def test_malformed_model_uris_are_refused(uri: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        resolve_model(uri)


def test_artifact_keys_are_lowercase_letters_digits_and_dashes() -> None:
    assert evaluation_artifact_key("Phi3.Mini_x", "12") == "eval-phi3-mini-x-12"


# --- comparison and parity --------------------------------------------------------------------


def _summary(version: str, *, eval_hash: str = HASH, flavor: str = "onnx", **metrics: float):
    base = {
        "n_items": 4.0,
        "pass_rate": 0.5,
        "pass_rate.factual": 0.5,
        "contains/mean": 0.5,
        "latency_p50_s": 1.0,
        "latency_p95_s": 2.0,
        "ttft_p95_s": 0.5,
        "s_per_token_p95": 0.02,
        "tokens_per_s": 100.0,
        "error_rate": 0.0,
        "peak_rss_mb": 500.0,
    }
    base.update({k.replace("__", "."): v for k, v in metrics.items()})
    return EvalSummary(
        run_id=f"run{version}",
        model_name="phi3-mini",
        version=version,
        model_uri=f"models:/phi3-mini/{version}",
        flavor=flavor,
        eval_set="smoke",
        eval_set_hash=eval_hash,
        metrics=base,
        tag_pass_rates={k[10:]: v for k, v in base.items() if k.startswith("pass_rate.")},
    )


def test_comparison_rows_give_deltas_and_which_way_is_better() -> None:
    candidate = _summary("2", pass_rate=0.75, latency_p95_s=3.0, pass_rate__safety=1.0)
    champion = _summary("1")
    rows = {row.metric: row for row in comparison_rows(candidate, champion)}
    assert list(rows)[:3] == ["pass_rate", "pass_rate.factual", "pass_rate.safety"]
    assert rows["pass_rate"].delta == pytest.approx(0.25) and rows["pass_rate"].change == "better"
    assert rows["latency_p95_s"].better == "lower" and rows["latency_p95_s"].change == "worse"
    assert rows["latency_p95_s"].ratio == pytest.approx(1.5)
    assert rows["tokens_per_s"].change == "same"
    assert rows["pass_rate.safety"].baseline is None and rows["pass_rate.safety"].change == "n/a"


def test_comparison_markdown_sets_candidate_and_champion_side_by_side() -> None:
    candidate = _summary("2", flavor="transformers", pass_rate=0.75)
    lookup = ChampionLookup(alias="champion", version="1", summary=_summary("1"))
    markdown = comparison_markdown(candidate, lookup, policy=GatePolicy())
    assert "candidate v2 (transformers)" in markdown and "@champion v1 (onnx)" in markdown
    assert "| pass_rate | 0.750 | 0.500 | +0.250 | ≥ 0.600 | pass |" in markdown
    assert "| latency_p50_s | 1.000 | 1.000 | +0.000 | same (lower is better) |" in markdown
    assert "No comparable" not in markdown


def _tables(markdown: str) -> list[list[str]]:
    """Each markdown table of ``markdown``, as its lines."""
    tables: list[list[str]] = []
    previous = ""
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_comparison_leads_with_the_gates_that_decide_and_heads_every_column() -> None:
    """The gated rows (value, champion, threshold, pass/FAIL) come before the ~35 per-tag rows,
    which a newcomer would otherwise scroll past to find the latency that failed the gate.
    """
    tags = {f"pass_rate__tag{i:02d}": 0.5 for i in range(35)}
    candidate = _summary(
        "2", latency_p95_s=3.0, s_per_token_p95=0.03, **tags | {"pass_rate__tag07": 0.1}
    )
    champion = _summary("1", **tags)
    policy = GatePolicy(min_tag_pass_rate={"factual": 0.4})
    markdown = comparison_markdown(
        candidate, ChampionLookup(alias="champion", version="1", summary=champion), policy=policy
    )
    gates, others = _tables(markdown)
    assert _cells(gates[0]) == [
        "gate",
        "candidate v2 (onnx)",
        "@champion v1 (onnx)",
        "delta",
        "threshold",
        "result",
    ]
    rows = {_cells(line)[0]: _cells(line) for line in gates[2:]}
    assert list(rows)[:6] == [
        "pass_rate",
        "pass_rate vs champion",
        "tokens_per_s",
        "tokens_per_s vs champion",
        "error_rate",
        "error_rate vs champion",
    ]
    # The latency gates are in the model's terms: time to first token and seconds per token.
    assert rows["s_per_token_p95 vs champion"][1:] == [
        "0.030",
        "0.020",
        "+0.010",
        "≤ 0.025",
        "FAIL",
    ]
    assert rows["ttft_p95_s vs champion"][-1] == "pass"
    assert not any(gate.startswith("latency_p95_s") for gate in rows)
    assert rows["tokens_per_s"][4:] == ["≥ 1.000", "pass"]
    assert rows["pass_rate.factual"][4:] == ["≥ 0.400", "pass"]  # a configured tag minimum
    # Of the per-tag margins against the champion, only the failing one is a row of its own.
    assert rows["pass_rate.tag07 vs champion"][-1] == "FAIL"
    assert not any(gate.startswith("pass_rate.tag0") and "07" not in gate for gate in rows)
    assert "35 of 36 tags at most 0.02 below it" in markdown  # 35 tags and factual
    assert markdown.index("| s_per_token_p95 vs champion |") < markdown.index("| pass_rate.tag00 |")
    # The rest: every per-tag row, each column headed; nothing shown twice but a failing tag.
    assert _cells(others[0]) == [
        "metric",
        "candidate v2 (onnx)",
        "@champion v1 (onnx)",
        "delta",
        "change",
    ]
    metrics = [_cells(line)[0] for line in others[2:]]
    assert {f"pass_rate.tag{i:02d}" for i in range(35)} <= set(metrics)
    assert not {"pass_rate", "s_per_token_p95", "tokens_per_s", "pass_rate.factual"} & set(metrics)
    assert "latency_p95_s" in metrics  # measured, not gated by default
    for table in (gates, others):
        assert all(_cells(table[0])), table[0]
        assert {len(_cells(line)) for line in table} == {len(_cells(table[0]))}


def test_comparison_markdown_refuses_a_champion_on_another_eval_set() -> None:
    candidate = _summary("2")
    lookup = ChampionLookup(
        alias="champion", version="1", summary=_summary("1", eval_hash=OTHER_HASH)
    )
    markdown = comparison_markdown(candidate, lookup, policy=GatePolicy())
    assert "## No comparable champion evaluation" in markdown
    assert f"hash {OTHER_HASH[:12]}" in markdown and f"hash {HASH[:12]}" in markdown
    assert "| pass_rate | 0.500 | ≥ 0.600 | FAIL |" in markdown  # its own results, gated
    assert "| pass_rate.factual | 0.500 |" in markdown
    assert "delta" not in markdown and "vs champion" not in markdown
    missing = comparison_markdown(
        candidate, ChampionLookup(alias="champion", reason="'phi3-mini' has no version aliased")
    )
    assert "No comparable" in missing and "has no version aliased" in missing


def test_parity_report_compares_flavors_and_refuses_different_eval_sets() -> None:
    onnx = _summary("1", flavor="onnx", latency_p50_s=0.5, tokens_per_s=200.0)
    torch = _summary("2", flavor="transformers", pass_rate=0.25, latency_p50_s=1.5)
    report = parity_report(onnx, torch)
    assert "# Parity: onnx vs transformers" in report
    assert "| pass_rate | 0.500 | 0.250 | -0.250 |" in report
    assert "| latency_p50_s | 0.500 | 1.500 | 3.00x |" in report
    assert "| tokens_per_s | 200.000 | 100.000 | 0.50x |" in report
    with pytest.raises(InvalidInputError, match="different eval sets"):
        parity_report(onnx, _summary("2", eval_hash=OTHER_HASH))


def test_eval_set_hash_used_in_the_fakes_is_the_loader_hash() -> None:
    items = [_item("a", "a")]
    assert len(hash_items(items)) == 64  # the comparisons key on this full digest


def test_speed_metrics_give_ttft_and_seconds_per_token_percentiles() -> None:
    """The gates' latency metrics: p95 time to first token (streamed samples) and p95 seconds
    per output token (each answered item's latency over its completion tokens).
    """
    import pandas as pd

    from tasks.evaluation.score import _metrics, seconds_per_token
    from tasks.evaluation.values import Generation, ItemGeneration

    items = [
        ItemGeneration(id=f"i{n}", content="x", latency_s=2.0, batch_size=1, completion_tokens=n)
        for n in (1, 4, 10, 20)
    ]
    failed = ItemGeneration(id="bad", content=None, error="boom", latency_s=9.0, batch_size=1)
    empty = ItemGeneration(id="e", content="", latency_s=1.0, batch_size=1, completion_tokens=0)
    assert seconds_per_token([*items, failed, empty]) == [2.0, 0.5, 0.2, 0.1]

    items = [*items, failed, empty]
    generation = Generation(items=items, wall_s=10.0, ttft_s=[0.1, 0.2, 0.3, 0.4, 1.0])
    table = pd.DataFrame({"passed": [True] * len(items), "tags": [[] for _ in items]})
    metrics = _metrics(_set(), generation, table)
    assert metrics["s_per_token_p95"] == pytest.approx(1.775)  # numpy's linear p95 of the four
    assert metrics["s_per_token_p50"] == pytest.approx(0.35)
    assert metrics["ttft_p95_s"] == pytest.approx(0.88)
    assert metrics["ttft_p50_s"] == pytest.approx(0.3)
    one = pd.DataFrame({"passed": [False], "tags": [[]]})
    untimed = _metrics(_set(), Generation(items=[failed], wall_s=1.0), one)
    assert "s_per_token_p95" not in untimed and "ttft_p95_s" not in untimed
