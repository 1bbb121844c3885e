"""Comparing evaluations: a candidate with the champion on the same eval set (markdown, published
as a Prefect artifact and in the run), and two flavors of one source (the parity report).

The comparison leads with what decides a promotion: one row per promotion gate (value, the
champion's, threshold, pass/FAIL), with the gates in settings; every other metric (per tag, per
scorer, the other speed figures) follows in a table of its own.
"""

from __future__ import annotations

import math
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from phi3ops import registry
from phi3ops.errors import InvalidInputError
from phi3ops.names import (
    CHAMPION_ALIAS,
    COMPARISON_ARTIFACT,
    TAG_PASS_RATE_PREFIX,
    evaluation_artifact_key,
)
from phi3ops.policies import GatePolicy
from phi3ops.settings import get_settings
from phi3ops.tracking import configure_tracking, run_url, version_url
from tasks.evaluation.values import HASH_PREFIX_LENGTH, ChampionLookup, EvalSummary
from tasks.gates import VERSUS, GateResult, evaluate_gates, gate_metric, threshold_text


class ComparisonRow(BaseModel):
    """One metric of two evaluations side by side."""

    metric: str
    candidate: float | None
    baseline: float | None
    delta: float | None  # candidate - baseline
    ratio: float | None  # candidate / baseline
    better: Literal["higher", "lower"]
    change: Literal["better", "worse", "same", "n/a"]


_LOWER_IS_BETTER = ("latency_", "ttft_", "s_per_token_", "error_rate", "n_errors", "peak_rss_mb")
_SPEED_METRICS = (
    "ttft_p50_s",
    "ttft_p95_s",
    "s_per_token_p50",
    "s_per_token_p95",
    "latency_p50_s",
    "latency_p95_s",
    "tokens_per_s",
    "error_rate",
    "peak_rss_mb",
)


def comparison_rows(candidate: EvalSummary, baseline: EvalSummary) -> list[ComparisonRow]:
    """The quality and speed metrics of two evaluations side by side, with deltas.

    Order: ``pass_rate``, ``pass_rate.<tag>`` (every tag of either), each scorer's
    ``<kind>/mean``, then time to first token and seconds per output token (p50/p95), latency
    p50/p95, tokens/s, error rate, memory.
    A metric only one of them has shows with the other side empty.
    """
    keys = ["pass_rate"]
    both = candidate.metrics.keys() | baseline.metrics.keys()
    keys += sorted(k for k in both if k.startswith("pass_rate."))
    keys += sorted(k for k in both if k.endswith("/mean"))
    keys += [k for k in _SPEED_METRICS if k in both]
    return [_row(key, candidate.metrics.get(key), baseline.metrics.get(key)) for key in keys]


def _row(metric: str, candidate: float | None, baseline: float | None) -> ComparisonRow:
    better: Literal["higher", "lower"] = (
        "lower" if metric.startswith(_LOWER_IS_BETTER) else "higher"
    )
    delta = ratio = None
    change: Literal["better", "worse", "same", "n/a"] = "n/a"
    if candidate is not None and baseline is not None:
        delta = candidate - baseline
        ratio = candidate / baseline if baseline else None
        if math.isclose(candidate, baseline, rel_tol=1e-9, abs_tol=1e-12):
            change = "same"
        elif (delta > 0) == (better == "higher"):
            change = "better"
        else:
            change = "worse"
    return ComparisonRow(
        metric=metric,
        candidate=candidate,
        baseline=baseline,
        delta=delta,
        ratio=ratio,
        better=better,
        change=change,
    )


def comparison_markdown(
    candidate: EvalSummary, champion: ChampionLookup, *, policy: GatePolicy | None = None
) -> str:
    """The candidate's evaluation against the champion's, as markdown (a pure function of its
    arguments and, without ``policy``, the gates in settings).

    First the promotion gates, one row each (the candidate's value, the champion's, the
    threshold, pass/FAIL): the absolute ones, and "not worse than the champion by more than a
    margin" when the champion has an evaluation on the same eval set (same content hash); the
    per-tag margin gates are counted in one line, and listed only when they fail. Then every
    other metric side by side with deltas, or the candidate's own results and why there is no
    comparison.

    Args:
        candidate: The evaluation shown.
        champion: The evaluation it is compared with, or why there is none.
        policy: The gates; default: those in settings (``PHI3OPS_GATE_*``).
    """
    head = _heading(candidate)
    policy = policy if policy is not None else get_settings().gates
    baseline = champion.summary
    if baseline is not None and baseline.eval_set_hash != candidate.eval_set_hash:
        reason = (
            f"@{champion.alias} (version {baseline.version}) was evaluated on eval set "
            f"{baseline.eval_set!r} (hash {baseline.eval_set_hash[:HASH_PREFIX_LENGTH]}), not "
            f"on this one (hash {candidate.eval_set_hash[:HASH_PREFIX_LENGTH]}): results are "
            f"compared only on the same eval set."
        )
        baseline = None
    else:
        reason = champion.reason or "no champion evaluation was given."
    gates = gate_results(candidate, baseline, policy=policy)
    if baseline is None:
        own = {r.metric: r for r in comparison_rows(candidate, candidate)}
        gated = _gated_metrics(gates)
        lines = [
            head,
            "",
            *_gates_heading(gates, against=None, drop=policy.max_pass_rate_drop),
            "",
            "| gate | value | threshold | result |",
            "|---|---:|---:|---|",
            *(
                f"| {g.gate} | {_fmt(g.candidate)} | {threshold_text(g, fmt=_fmt)} | {_result(g)} |"
                for g in _shown_gates(gates)
            ),
            "",
            "## No comparable champion evaluation",
            "",
            reason,
            "",
            f"## Other results of version {candidate.version}",
            "",
            "| metric | value |",
            "|---|---:|",
            *(
                f"| {r.metric} | {_fmt(r.candidate)} |"
                for name, r in own.items()
                if name not in gated
            ),
        ]
        return "\n".join([*lines, *_notes(candidate)]) + "\n"
    cand_col = f"candidate v{candidate.version} ({candidate.flavor})"
    base_col = f"@{champion.alias} v{baseline.version} ({baseline.flavor})"
    rows = {r.metric: r for r in comparison_rows(candidate, baseline)}
    gated = _gated_metrics(gates)
    lines = [
        head,
        "",
        *_gates_heading(
            gates,
            against=f"@{champion.alias} v{baseline.version}",
            drop=policy.max_pass_rate_drop,
        ),
        "",
        f"| gate | {cand_col} | {base_col} | delta | threshold | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for g in _shown_gates(gates):
        row = rows.get(gate_metric(g))
        lines.append(
            f"| {g.gate} | {_fmt(g.candidate)} | "
            f"{_fmt(row.baseline if row else g.champion)} | "
            f"{_fmt(row.delta if row else None, signed=True)} | "
            f"{threshold_text(g, fmt=_fmt)} | {_result(g)} |"
        )
    lines += [
        "",
        f"## Every other metric, against @{champion.alias} (version {baseline.version}, "
        f"run `{baseline.run_id}`)",
        "",
        f"| metric | {cand_col} | {base_col} | delta | change |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows.values():
        if row.metric in gated:
            continue
        lines.append(
            f"| {row.metric} | {_fmt(row.candidate)} | {_fmt(row.baseline)} | "
            f"{_fmt(row.delta, signed=True)} | {row.change} ({row.better} is better) |"
        )
    return "\n".join([*lines, *_notes(candidate)]) + "\n"


def gate_results(
    candidate: EvalSummary, baseline: EvalSummary | None, *, policy: GatePolicy
) -> list[GateResult]:
    """The promotion gates on ``candidate``: the absolute ones, and the margins against
    ``baseline`` when it is another version's evaluation on the same eval set.
    """
    compared = baseline is not None and baseline.version != candidate.version
    decision = evaluate_gates(
        candidate.model_name,
        candidate.version,
        candidate,
        baseline if compared else None,
        champion_version=baseline.version if compared and baseline else None,
        policy=policy,
    )
    return decision.gates


def _is_tag_margin(gate: GateResult) -> bool:
    """A per-tag margin gate against the champion (one per tag both evaluations have)."""
    return gate.gate.startswith(TAG_PASS_RATE_PREFIX) and VERSUS in gate.gate


def _shown_gates(gates: list[GateResult]) -> list[GateResult]:
    """Every gate but the per-tag margins that pass, grouped by metric, absolute ones first."""
    shown = [g for g in gates if not _is_tag_margin(g) or not g.passed]
    order = {m: i for i, m in enumerate(dict.fromkeys(gate_metric(g) for g in shown))}
    return sorted(shown, key=lambda g: (order[gate_metric(g)], VERSUS in g.gate))


def _gated_metrics(gates: list[GateResult]) -> set[str]:
    """The metrics the gates table shows in full (left out of the other table); a tag whose
    margin alone failed stays in the other table too, beside the other tags.
    """
    return {gate_metric(g) for g in _shown_gates(gates) if not _is_tag_margin(g)}


def _gates_heading(gates: list[GateResult], *, against: str | None, drop: float) -> list[str]:
    passed = sum(g.passed for g in gates)
    lines = [
        f"## Promotion gates: {passed} of {len(gates)} pass",
        "",
        "With the gates in settings (`PHI3OPS_GATE_*`); a promotion may override them, and its "
        "decision lists the gates it applied."
        + ("" if against else " No margin against the champion is checked here (see below)."),
    ]
    margins = [g for g in gates if _is_tag_margin(g)]
    if margins:
        ok = sum(g.passed for g in margins)
        lines += [
            "",
            f"Pass rate of each tag against {against}: {ok} of {len(margins)} tags at most "
            f"{drop:g} below it"
            + ("." if ok == len(margins) else "; the others are in the table below."),
        ]
    return lines


def _result(gate: GateResult) -> str:
    if gate.candidate is None:
        return "FAIL (not measured)"
    return "pass" if gate.passed else "FAIL"


def _heading(summary: EvalSummary) -> str:
    items = summary.metrics.get("n_items")
    count = f", {int(items)} items" if items is not None else ""
    return (
        f"# Evaluation of {summary.model_name} version {summary.version} ({summary.flavor})\n\n"
        f"Eval set `{summary.eval_set}` (hash `{summary.eval_set_hash[:HASH_PREFIX_LENGTH]}`"
        f"{count}); MLflow run `{summary.run_id}`."
    )


def _notes(summary: EvalSummary) -> list[str]:
    if not summary.notes:
        return []
    return ["", "Notes:", "", *(f"* {note}" for note in summary.notes)]


def _fmt(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:+.3g}" if signed else f"{value:.3g}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def parity_report(summary_a: EvalSummary, summary_b: EvalSummary) -> str:
    """Two evaluations of one source through two flavors (e.g. ONNX and transformers), as
    markdown: pass rates per tag and per scorer with differences, and speed ratios (B / A).

    Raises:
        InvalidInputError: The two ran different eval sets (different content hashes).
    """
    if summary_a.eval_set_hash != summary_b.eval_set_hash:
        raise InvalidInputError(
            f"Cannot compare evaluations on different eval sets: {summary_a.eval_set!r} (hash "
            f"{summary_a.eval_set_hash[:HASH_PREFIX_LENGTH]}) and {summary_b.eval_set!r} (hash "
            f"{summary_b.eval_set_hash[:HASH_PREFIX_LENGTH]}). Evaluate both versions on the "
            f"same set."
        )
    a = f"A: {summary_a.flavor} (v{summary_a.version})"
    b = f"B: {summary_b.flavor} (v{summary_b.version})"
    rows = comparison_rows(summary_b, summary_a)  # candidate = B, baseline = A
    quality = [r for r in rows if r.metric not in _SPEED_METRICS]
    speed = [r for r in rows if r.metric in _SPEED_METRICS]
    lines = [
        f"# Parity: {summary_a.flavor} vs {summary_b.flavor}",
        "",
        f"{summary_a.model_name} v{summary_a.version} (run `{summary_a.run_id}`) and "
        f"{summary_b.model_name} v{summary_b.version} (run `{summary_b.run_id}`) on eval set "
        f"`{summary_a.eval_set}` (hash `{summary_a.eval_set_hash[:HASH_PREFIX_LENGTH]}`).",
        "",
        "## Quality",
        "",
        f"| metric | {a} | {b} | B - A |",
        "|---|---:|---:|---:|",
        *(
            f"| {r.metric} | {_fmt(r.baseline)} | {_fmt(r.candidate)} | "
            f"{_fmt(r.delta, signed=True)} |"
            for r in quality
        ),
        "",
        "## Speed",
        "",
        f"| metric | {a} | {b} | B / A |",
        "|---|---:|---:|---:|",
        *(
            f"| {r.metric} | {_fmt(r.baseline)} | {_fmt(r.candidate)} | "
            f"{'—' if r.ratio is None else f'{r.ratio:.2f}x'} |"
            for r in speed
        ),
    ]
    notes = [f"* A: {n}" for n in summary_a.notes] + [f"* B: {n}" for n in summary_b.notes]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def publish_comparison(summary: EvalSummary, markdown: str, *, log_to_run: bool = True) -> str:
    """Publishes the comparison as a Prefect markdown artifact (and in the MLflow run).

    Args:
        summary: The evaluation compared.
        markdown: `comparison_markdown` of it.
        log_to_run: Also write it to the run as ``comparison.md`` (off for a reused run, which
            keeps the comparison it was recorded with).

    Returns:
        The artifact key.
    """
    from prefect.artifacts import create_markdown_artifact

    key = evaluation_artifact_key(summary.model_name, summary.version)
    create_markdown_artifact(
        markdown=markdown + mlflow_links(summary),
        key=key,
        description=(
            f"Evaluation of {summary.model_name} v{summary.version} on {summary.eval_set} "
            f"against @{CHAMPION_ALIAS}"
        ),
    )
    if log_to_run:
        configure_tracking()
        registry.client().log_text(summary.run_id, markdown, COMPARISON_ARTIFACT)
    return key


def mlflow_links(summary: EvalSummary) -> str:
    """Markdown links to the evaluation's run and version in the MLflow UI, when the tracking
    store is an http(s) server (a local store has no UI address); else empty.
    """
    run, version = run_url(summary.run_id), version_url(summary.model_name, summary.version)
    if run is None or version is None:
        return ""
    return (
        f"\nMLflow: [evaluation run {summary.run_id}]({run}) · "
        f"[{summary.model_name} v{summary.version}]({version})\n"
    )


# --- Prefect task: no retries (nothing here is transient), no caching (stores) ----------------


@task(name="publish-comparison", cache_policy=NO_CACHE)
def publish_comparison_task(summary: EvalSummary, champion: ChampionLookup) -> str:
    """`comparison_markdown` (with the gates in settings) published by `publish_comparison`;
    returns the markdown.
    """
    markdown = comparison_markdown(summary, champion)
    publish_comparison(summary, markdown, log_to_run=not summary.reused)
    return markdown
