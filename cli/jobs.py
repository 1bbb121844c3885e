"""What each CLI command runs: one pipeline, on the real source (`make run`) or offline (`demo`).

Every job checks first that its source can be fetched at all, so an offline machine or a typo
fails in seconds instead of after the orchestration layer has started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from deployments.setup import check_prefect_api
from flows.evaluate import evaluate_flow
from flows.fetch import fetch_flow
from flows.lifecycle import LifecycleResult, Source, lifecycle_flow
from flows.monitor import monitor_flow
from flows.package import package_flow
from flows.promote import promote_flow
from flows.rollback import rollback_flow
from offline.local_hub import LocalHub
from offline.tiny_phi3 import ensure_tiny_phi3
from phi3ops.errors import InvalidInputError
from phi3ops.evalset import DEFAULT_EVAL_SET, open_eval_set
from phi3ops.names import CANDIDATE_ALIAS, CHAMPION_ALIAS
from phi3ops.policies import GateOverrides, ThresholdOverrides, invalid_input
from phi3ops.registry import resolve_model, resolve_model_name
from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant, source_variant
from phi3ops.tracking import tracking_uri, use_tracking_store
from phi3ops.traffic import TrafficMode, TrafficPlan
from tasks.evaluation import EvalSummary, find_evaluation
from tasks.hub import FetchResult, check_fetchable, resolve_hf_token
from tasks.monitoring import window_bounds
from tasks.registry import RegisteredVersion


def _check_source(
    repo_id: str, *, revision: str, variant: Variant, target_dir: Path | None = None
) -> None:
    check_fetchable(
        repo_id,
        revision=revision,
        variant=variant,
        target_root=target_dir,
        token=resolve_hf_token(),
    )


def _registered_model(model_name: str | None) -> str:
    """The checked model name, once the tracking store answers (in seconds, before Prefect)."""
    name = resolve_model_name(model_name)
    use_tracking_store()
    return name


def fetch_job(
    repo_id: str,
    *,
    revision: str = "main",
    variant: Variant = Variant.ONNX_CPU_INT4,
    target_dir: Path | None = None,
    build_onnx: bool = False,
) -> FetchResult:
    """Check the source, then run the fetch flow."""
    _check_source(repo_id, revision=revision, variant=variant, target_dir=target_dir)
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return fetch_flow(
        repo_id=repo_id,
        revision=revision,
        variant=variant,
        target_dir=target_dir,
        build_onnx=build_onnx,
    )


def package_job(
    *,
    flavor: Flavor | str,
    repo_id: str | None = None,
    revision: str = "main",
    variant: Variant | None = None,
    model_name: str | None = None,
) -> RegisteredVersion:
    """Check the inputs and the source, then run the package flow (fetch -> log -> register)."""
    chosen = Flavor(flavor)
    name = _registered_model(model_name)
    fetch_variant, _ = source_variant(chosen, variant)
    repo_id = repo_id or fetch_variant.default_repo_id
    _check_source(repo_id, revision=revision, variant=fetch_variant)
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return package_flow(
        flavor=chosen, repo_id=repo_id, revision=revision, variant=variant, model_name=name
    )


def evaluate_job(
    *,
    model_uri: str | None = None,
    eval_set: str | None = None,
    compare_to_alias: str = CHAMPION_ALIAS,
    force: bool = False,
    shards: int = 1,
) -> EvalSummary:
    """Check the model URI and the eval set, then run the evaluate flow.

    Args:
        model_uri: The version to evaluate; defaults to ``models:/<registered model>@candidate``.
        eval_set: Eval set name or path; the default set when None.
        compare_to_alias: Whose evaluation on the same eval set to compare with.
        force: Generate and score again even when the version has an evaluation on this set.
        shards: Flow runs of the eval-shard deployment to generate in (1: in this process).
    """
    uri = model_uri or f"models:/{get_settings().registered_model_name}@{CANDIDATE_ALIAS}"
    resolve_model(uri)  # an unknown model, alias or version fails before Prefect starts
    loaded = open_eval_set(eval_set)  # so does a missing or invalid eval set
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return evaluate_flow(
        model_uri=uri,
        eval_set=str(loaded.path),
        compare_to_alias=compare_to_alias,
        reuse=not force,
        shards=shards,
    )


def promote_job(
    *,
    model_name: str | None = None,
    candidate: str = CANDIDATE_ALIAS,
    eval_set: str | None = None,
    gates: list[str] | None = None,
    evaluate_champion: bool = True,
    live_traffic: TrafficMode | None = None,
    canary_share: float | None = None,
) -> Any:
    """Check the model name, the eval set, the ``key=value`` gate overrides and the canary
    share, then run the promote flow with the checked values.
    """
    name = _registered_model(model_name)
    overrides = gate_overrides(gates)
    get_settings().gates.with_overrides(overrides)  # out-of-range values fail here
    if live_traffic is not None:
        TrafficPlan.start(live_traffic, share=canary_share)  # a share that does not fit
    elif canary_share is not None:
        raise InvalidInputError("--canary-share applies with --live-traffic canary only.")
    loaded = open_eval_set(eval_set)
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return promote_flow(
        model_name=name,
        candidate=candidate,
        eval_set=str(loaded.path),
        evaluate_champion=evaluate_champion,
        gates=overrides,
        live_traffic=live_traffic,
        canary_share=canary_share,
    )


def rollback_job(
    *, model_name: str | None = None, to_version: str | None = None, smoke_eval_set: str | None
) -> Any:
    """Check the model name and the smoke eval set, then run the rollback flow (champion <-
    previous, then a smoke evaluation).
    """
    name = _registered_model(model_name)
    smoke = str(open_eval_set(smoke_eval_set).path) if smoke_eval_set else None
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return rollback_flow(model_name=name, to_version=to_version, smoke_eval_set=smoke)


def monitor_job(
    *,
    model_name: str | None = None,
    alias: str = CHAMPION_ALIAS,
    window_minutes: int | None = None,
    baseline_eval_set: str | None = None,
    thresholds: list[str] | None = None,
) -> Any:
    """Check the threshold overrides, the window and the baseline eval set, then run the
    monitor flow with the checked overrides (the deployment's typed parameter).

    Returns:
        The monitoring report (`tasks.monitoring.MonitorReport`); a failed suite raises
        `MonitoringFailedError`.
    """
    name = _registered_model(model_name)
    overrides = _overrides(
        ThresholdOverrides, thresholds, option="--threshold", example="max_error_rate=0.01"
    )
    get_settings().monitor.with_overrides(overrides)  # out-of-range values fail here
    window_bounds(window_minutes)
    loaded = open_eval_set(baseline_eval_set)
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return monitor_flow(
        model_name=name,
        alias=alias,
        window_minutes=window_minutes,
        baseline_eval_set=str(loaded.path),
        thresholds=overrides,
    )


def gate_overrides(items: list[str] | Mapping[str, Any] | None) -> BaseModel:
    """``--gate key=number`` items (or a mapping) as checked `GateOverrides`.

    Raises:
        InvalidInputError: An item is not ``key=number``, names no gate, or is out of range.
    """
    return _overrides(GateOverrides, items, option="--gate", example="min_pass_rate=0.7")


def _overrides(
    model: type[BaseModel],
    items: list[str] | Mapping[str, Any] | None,
    *,
    option: str,
    example: str,
) -> BaseModel:
    what = option.removeprefix("--") + "s"
    if isinstance(items, Mapping):  # from code: pydantic names what is wrong
        values = dict(items)
    else:  # from the command line: say which names exist
        values = parse_overrides(items, option=option, example=example)
        unknown = sorted(set(values) - set(model.model_fields))
        if unknown:
            raise InvalidInputError(
                f"{option}: unknown name(s) {', '.join(unknown)}; use any of "
                f"{', '.join(model.model_fields)}."
            )
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid_input(exc, what=what) from exc


def parse_overrides(items: list[str] | None, *, option: str, example: str) -> dict[str, float]:
    """``["key=number", ...]`` (a repeatable CLI option) as a dict; names are checked by the
    caller.

    Raises:
        InvalidInputError: An item is not ``key=number``.
    """
    overrides: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInputError(
                f"{option} {item!r} is not key=number, e.g. {option} {example}."
            )
    return overrides


#: The gates `demo_job` relaxes. The tiny Phi-3 has random weights: it answers gibberish, so its
#: pass rate is ~0 and its speed says nothing about a real model. Errors stay gated. `main_job`
#: (the real Phi-3) keeps the gates in settings.
DEMO_GATES: dict[str, float] = {
    "min_pass_rate": 0.0,
    "max_pass_rate_drop": 1.0,
    "min_tokens_per_s": 0.0,
    "max_tokens_per_s_drop": 1.0,
    "max_ttft_increase": 10.0,
    "max_s_per_token_increase": 10.0,
}


def lifecycle_job(
    *,
    repo_id: str | None = None,
    revision: str = "main",
    flavor: Flavor | str = Flavor.ONNX,
    variant: Variant | None = None,
    model_name: str | None = None,
    eval_set: str | None = None,
    gates: list[str] | Mapping[str, Any] | None = None,
    evaluate_champion: bool = True,
) -> LifecycleResult:
    """Check every input and the source, then run the lifecycle flow (fetch -> package ->
    evaluate -> promote).

    Args:
        repo_id: Hub repository; None: the variant's Microsoft repository.
        revision: Branch, tag or commit sha.
        flavor: ``onnx`` or ``transformers``.
        variant: What to fetch; None: the flavor's default.
        model_name: Registered model; None: ``PHI3OPS_REGISTERED_MODEL_NAME``.
        eval_set: Eval set name or path; None: the default set.
        gates: Gate overrides for this run: ``--gate key=number`` items or a mapping.
        evaluate_champion: Evaluate the champion on the eval set first when it has none there.

    Raises:
        InvalidInputError: A bad input, found before Prefect starts.
        HubError: The source cannot be fetched (offline, unknown repo or revision), found in
            about a second, before Prefect starts.
    """
    try:
        source = Source(repo_id=repo_id, revision=revision, flavor=flavor, variant=variant)
    except ValidationError as exc:
        raise invalid_input(exc, what="source") from exc
    overrides = gate_overrides(gates)
    name = _registered_model(model_name)
    get_settings().gates.with_overrides(overrides)
    loaded = open_eval_set(eval_set or DEFAULT_EVAL_SET)
    fetch_repo, fetch_variant, _ = source.fetch_plan
    _check_source(fetch_repo, revision=revision, variant=fetch_variant)
    check_prefect_api()  # bounded, naming the URL: a silent Prefect API fails, not hangs
    return lifecycle_flow(
        source=source,
        model_name=name,
        eval_set=str(loaded.path),
        gates=overrides,
        evaluate_champion=evaluate_champion,
    )


def main_job(**options: Any) -> LifecycleResult:
    """The lifecycle on the real Phi-3 (by default the ONNX int4 repository, onnx flavor), with
    the gates in settings.

    Args:
        **options: `lifecycle_job`'s keyword arguments (the CLI's ``run`` options).
    """
    result = lifecycle_job(**options)
    _print_summary(result)
    return result


def demo_job(*, eval_set: str | None = None) -> LifecycleResult:
    """The same lifecycle, offline: a tiny random Phi-3 built locally, served from a local hub,
    with the quality gates relaxed (`DEMO_GATES`) because its weights are random.

    Its own data dir (``<data dir>/demo``), so the tiny model never stands in for a real one;
    run it again and everything is reused.
    """
    saved = {name: os.environ.get(name) for name in ("PHI3OPS_DATA_DIR", "PHI3OPS_HF_ENDPOINT")}
    try:
        os.environ["PHI3OPS_DATA_DIR"] = str(get_settings().data_dir / "demo")
        get_settings.cache_clear()
        repos = ensure_tiny_phi3(get_settings().cache_dir / "tiny-phi3")
        with LocalHub() as hub:
            hub.add_repo(ONNX_REPO_ID, repos.onnx_dir)
            hub.add_repo(PYTORCH_REPO_ID, repos.pytorch_dir)
            os.environ["PHI3OPS_HF_ENDPOINT"] = hub.url
            get_settings.cache_clear()
            print(f"Local hub serving the tiny Phi-3 at {hub.url}")
            relaxed = ", ".join(f"{k}={v:g}" for k, v in DEMO_GATES.items())
            print(
                f"Demo gates: {relaxed}. The tiny Phi-3 has RANDOM weights (it answers "
                f"gibberish, pass rate ~0), so the demo relaxes the quality and speed gates; "
                f"`phi3ops run` on the real Phi-3 keeps the gates in settings."
            )
            result = lifecycle_job(repo_id=ONNX_REPO_ID, eval_set=eval_set, gates=DEMO_GATES)
            _print_summary(result)
            return result
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def _print_summary(result: LifecycleResult) -> None:
    """The version, the decision, the champion and its metrics, and where to look at them."""
    settings = get_settings()
    made = "reused" if result.package_reused else "registered"
    evaluated = "reused" if result.evaluation_reused else "new"
    lines = [
        "",
        f"{result.model_name} version {result.version} ({result.flavor.value}) from "
        f"{result.source}: {made}; evaluation on {result.eval_set} {evaluated} "
        f"(run {result.eval_run_id}); promotion: {result.decision}",
    ]
    if result.decision == "rejected":
        lines += [f"  failed gate: {reason}" for reason in result.reasons]
    if result.champion is None:
        lines.append(f"No champion: nothing of {result.model_name} has passed the gates yet.")
    else:
        if result.is_champion:
            metrics = result.metrics
        else:
            found = find_evaluation(result.model_name, result.champion, result.eval_set_hash)
            metrics = found.metrics if found is not None else {}
        lines.append(
            f"Champion: models:/{result.model_name}@champion = version {result.champion}, "
            f"on {result.eval_set}:"
        )
        lines += [f"  {key:<18} {metrics[key]:.4g}" for key in _HEADLINE if key in metrics]
    prefect_api = os.environ.get("PREFECT_API_URL")
    prefect_ui = (
        f"open {prefect_api.removesuffix('/api')}"
        if prefect_api
        else "prefect server start, then open http://127.0.0.1:4200 (flow 'lifecycle')"
    )
    lines += [
        f"  tracking store: {tracking_uri()}",
        f"  MLflow UI:      mlflow ui --backend-store-uri {tracking_uri()}",
        f"  Prefect UI:     {prefect_ui}",
        f"  serve it:       PHI3OPS_DATA_DIR={settings.data_dir} phi3ops serve "
        f"--model-name {result.model_name}   (records every request as a trace)",
        f"  monitor it:     PHI3OPS_DATA_DIR={settings.data_dir} phi3ops monitor "
        f"--model-name {result.model_name}",
    ]
    print("\n".join(lines))


# The metrics the summary shows (every one is in the MLflow run).
_HEADLINE = (
    "pass_rate",
    "error_rate",
    "latency_p50_s",
    "latency_p95_s",
    "ttft_p50_s",
    "tokens_per_s",
    "peak_rss_mb",
    "n_items",
)
