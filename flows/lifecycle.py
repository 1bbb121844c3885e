"""Stage 6 — lifecycle: hub repo@revision to a promoted (or rejected) registry version, in one run.

Reads like the pipeline: check every parameter (before any work) → fetch (pinned; ONNX int4
built from PyTorch weights when the source needs it) → package + register (the version with
the same package key is reused) → evaluate (the version's evaluation on the same eval set is
reused) → promote through the gates (nothing to do when the version is already the champion,
unless a crashed run left its promotion unfinished: the promote flow finishes it).

Run it again on an unchanged source and nothing is logged, generated or moved: the same
version, the same evaluation and the same champion come back.

The run tells its own story too (the subflows have the details): a Prefect artifact
``lifecycle-summary-<model>`` (source, version, evaluation, each gate, the decision, MLflow
links) and the same headline in its logs, after a line saying how long the evaluation took and
how many items were refused or timed out (none, when its deadline covers the work).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.evaluate import evaluate_flow
from flows.fetch import fetch_flow
from flows.package import package_flow
from flows.promote import promote_flow
from phi3ops.errors import InvalidInputError
from phi3ops.evalset import DEFAULT_EVAL_SET, open_eval_set
from phi3ops.names import CHAMPION_ALIAS
from phi3ops.policies import GateOverrides
from phi3ops.registry import alias_version, resolve_model_name
from phi3ops.settings import get_settings
from phi3ops.sources import ONNX_REPO_ID, PYTORCH_REPO_ID, Flavor, Variant, source_variant
from phi3ops.traffic import CanaryShare, TrafficMode, TrafficPlan
from tasks.alias_lock import check_alias_lock
from tasks.evaluation.generate import evaluation_line
from tasks.gates import Decision
from tasks.lifecycle_summary import (
    LifecycleReport,
    lifecycle_headline,
    publish_lifecycle_summary_task,
)
from tasks.promotion import pending_intent

__all__ = ["LifecycleResult", "Source", "lifecycle_flow"]

logger = logging.getLogger(__name__)


class Source(BaseModel):
    """Which model to take from the hub, and how to package it."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = Field(
        default=None,
        min_length=3,
        examples=[ONNX_REPO_ID, PYTORCH_REPO_ID],
        description=(
            "Hugging Face hub repository, org/name, e.g. a fine-tune of Phi-3. Empty: the "
            f"variant's Microsoft repository, {ONNX_REPO_ID} (published ONNX int4) for "
            f"onnx-cpu-int4, {PYTORCH_REPO_ID} for pytorch."
        ),
    )
    revision: str = Field(
        default="main",
        min_length=1,
        description="Branch, tag or commit sha; it is pinned to a commit sha before download.",
    )
    flavor: Flavor = Field(
        default=Flavor.ONNX,
        description=(
            "How to package it: 'onnx' (onnxruntime-genai int4 pyfunc) or 'transformers' "
            "(MLflow transformers flavor, task llm/v1/chat; needs variant 'pytorch')."
        ),
    )
    variant: Variant | None = Field(
        default=None,
        description=(
            "Files to fetch: 'onnx-cpu-int4' (the published int4 build) or 'pytorch' "
            "(safetensors; built to ONNX int4 locally when the flavor is 'onnx'). Empty: "
            "onnx-cpu-int4 for flavor 'onnx', pytorch for 'transformers'."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> Source:
        variant, _ = source_variant(self.flavor, self.variant)  # transformers needs pytorch
        other = Variant.PYTORCH if variant is Variant.ONNX_CPU_INT4 else Variant.ONNX_CPU_INT4
        if self.repo_id == other.default_repo_id:
            hint = (
                " or variant 'pytorch' to build ONNX int4 from its weights"
                if self.flavor is Flavor.ONNX
                else ""
            )
            raise InvalidInputError(
                f"{self.repo_id} publishes the {other.value!r} variant, not {variant.value!r} "
                f"that flavor {self.flavor.value!r} needs here: set repo_id to "
                f"{variant.default_repo_id} (or leave it empty){hint}."
            )
        return self

    @property
    def fetch_plan(self) -> tuple[str, Variant, bool]:
        """The repository to fetch, the variant, and whether to build ONNX int4 from it."""
        variant, build_onnx = source_variant(self.flavor, self.variant)
        return self.repo_id or variant.default_repo_id, variant, build_onnx


class LifecycleResult(BaseModel):
    """What one lifecycle run did, in a form small enough to pass around and print."""

    model_name: str
    version: str
    model_uri: str
    flavor: Flavor
    source: str = Field(description="repo_id@commit sha that was packaged.")
    package_reused: bool = Field(description="The version existed: nothing was logged.")
    evaluation_reused: bool = Field(description="Its evaluation existed: nothing was generated.")
    eval_run_id: str
    eval_set: str
    eval_set_hash: str
    metrics: dict[str, float]
    decision: Literal["promoted", "rejected", "unchanged", "live-traffic"] = Field(
        description="live-traffic: it passed the gates and takes live traffic first."
    )
    reasons: list[str] = Field(description="Failed gates when rejected, else every gate checked.")
    champion: str | None = Field(description="The champion version after this run.")

    @property
    def is_champion(self) -> bool:
        """Whether this run's version is the champion now."""
        return self.champion == self.version


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(
    source: Source = Source(),  # noqa: B008 - the UI form shows the default; never mutated
    model_name: str | None = None,
    eval_set: str = DEFAULT_EVAL_SET,
    gates: GateOverrides = GateOverrides(),  # noqa: B008 - as above
    evaluate_champion: bool = True,
    live_traffic: TrafficMode | None = None,
    canary_share: CanaryShare | None = None,
) -> LifecycleResult:
    """Fetch, package, register, evaluate and promote one Phi-3 source.

    Args:
        source: Hub repository, revision, flavor and variant; by default the published ONNX
            int4 Phi-3-mini-4k-instruct, packaged with the onnx flavor.
        model_name: Registered model the version goes to; empty: PHI3OPS_REGISTERED_MODEL_NAME
            (phi3-mini).
        eval_set: Eval set name in evals/ (phi3-default, smoke) or path of a .jsonl file; the
            candidate and the champion are compared on this set only.
        gates: Promotion gates to override for this run (empty fields keep PHI3OPS_GATE_*).
        evaluate_champion: Evaluate the current champion on the eval set first when it has no
            evaluation there (otherwise the comparison gate fails).
        live_traffic: Empty: a version that passes the gates is promoted at once. 'canary' or
            'shadow': it first takes live traffic beside @champion, and the canary
            deployment's verdict on that traffic promotes it (or takes it out).
        canary_share: With live_traffic 'canary': the share of requests it answers (between 0
            and 1; empty: 0.1).

    Returns:
        The version, whether it and its evaluation were reused, its metrics, and the decision.
    """
    # Every parameter is checked here, once, before anything is fetched (Prefect validated the
    # types); the stages below get the checked values.
    name = resolve_model_name(model_name)
    repo_id, variant, build_onnx = source.fetch_plan
    get_settings().gates.with_overrides(gates)  # out-of-range values fail before any work
    if live_traffic is not None:
        TrafficPlan.start(live_traffic, share=canary_share)  # a share that does not fit fails now
    check_alias_lock(name)  # a missing Prefect limit fails now, not after the evaluation
    eval_set = str(open_eval_set(eval_set).path)

    fetched = fetch_flow(
        repo_id=repo_id, revision=source.revision, variant=variant, build_onnx=build_onnx
    )
    registered = package_flow(fetched, flavor=source.flavor, model_name=name)
    started = time.monotonic()
    summary = evaluate_flow(model_uri=registered.model_uri, eval_set=eval_set)
    logger.info("%s", evaluation_line(summary, took_s=time.monotonic() - started))

    verdict: Decision | None = None
    if alias_version(name, CHAMPION_ALIAS) == registered.version and pending_intent(name) is None:
        print(f"{registered.model_uri} is already the champion: nothing to promote.")
        decision, reasons = "unchanged", []
    else:
        verdict = promote_flow(
            model_name=name,
            candidate=registered.version,
            eval_set=eval_set,
            evaluate_champion=evaluate_champion,
            gates=gates,
            live_traffic=live_traffic,
            canary_share=canary_share,
        )
        decision = (
            "live-traffic"
            if verdict.live_traffic
            else "promoted"
            if verdict.promote
            else "rejected"
        )
        reasons = verdict.reasons

    result = LifecycleResult(
        model_name=name,
        version=registered.version,
        model_uri=registered.model_uri,
        flavor=registered.flavor,
        source=f"{fetched.repo_id}@{fetched.commit_sha}",
        package_reused=registered.reused,
        evaluation_reused=summary.reused,
        eval_run_id=summary.run_id,
        eval_set=summary.eval_set,
        eval_set_hash=summary.eval_set_hash,
        metrics=summary.metrics,
        decision=decision,
        reasons=reasons,
        champion=alias_version(name, CHAMPION_ALIAS),
    )
    report = LifecycleReport(
        fetched=fetched,
        built_onnx=build_onnx,
        registered=registered,
        evaluation=summary,
        outcome=decision,
        decision=verdict,
        champion=result.champion,
    )
    publish_lifecycle_summary_task(report)
    for line in lifecycle_headline(report):
        logger.info("%s", line)
    return result
