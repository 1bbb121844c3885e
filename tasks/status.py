"""A registered model's versions at a glance: what `phi3ops status` prints, and the markdown
description each version carries in the MLflow registry.

Everything here is read back from what the stages record, nothing is stored twice:

- aliases: the registered model's own aliases;
- source and packaging: the version's lineage tags (`LineageTag`);
- last evaluation: the runs its ``phi3ops.eval.<hash>`` tags point at (the newest that finished);
- promotion: its ``phi3ops.promotion.*`` tags; monitoring: its ``phi3ops.monitor.*`` tags;
- canary: the model's traffic plan (`phi3ops.traffic`) and the version's ``phi3ops.canary.*``
  verdict tags;
- records: the inference records the servers on this data dir have spooled and not yet stored
  (`phi3ops.serving.spool.read_backlog`).

`refresh_description` writes `version_markdown` as the version's description; the stages call it
after they record something the description shows (registration, an evaluation, a decision), so
the MLflow UI's version page says the same as ``phi3ops status``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel, Field

from phi3ops import registry
from phi3ops.errors import RegistryError
from phi3ops.names import (
    CANARY_TAG_PREFIX,
    EVALUATION_TAG_PREFIX,
    LATENCY_P95,
    MONITOR_TAG_PREFIX,
    PASS_RATE,
    PROMOTION_TAG_PREFIX,
    S_PER_TOKEN_P95,
    TOKENS_PER_S,
    TTFT_P95,
    EvalTag,
    LineageTag,
)
from phi3ops.serving.spool import read_backlog
from phi3ops.settings import get_settings
from phi3ops.traffic import TrafficPlan, read_plan

__all__ = [
    "LastEvaluation",
    "ModelStatus",
    "VersionStatus",
    "model_status",
    "refresh_description",
    "version_markdown",
    "version_status",
]

logger = logging.getLogger(__name__)


class LastEvaluation(BaseModel):
    """The newest finished evaluation of a version (on any eval set)."""

    run_id: str
    eval_set: str
    eval_set_hash: str
    started_ms: int = Field(description="Start of the evaluation run, ms since the epoch.")
    pass_rate: float | None = None
    latency_p95_s: float | None = None
    ttft_p95_s: float | None = None
    s_per_token_p95: float | None = None
    tokens_per_s: float | None = None


class VersionStatus(BaseModel):
    """One version: where it came from, how it did, and what it is doing now."""

    version: str
    aliases: list[str] = Field(default_factory=list)
    source: str | None = Field(default=None, description="repo@commit sha (lineage tags).")
    flavor: str | None = None
    quantization: str | None = None
    evaluation: LastEvaluation | None = None
    promotion: str | None = Field(default=None, description="The last promotion decision.")
    promotion_reasons: list[str] = Field(default_factory=list)
    monitor: str | None = Field(default=None, description="The last monitoring outcome.")
    monitor_run_id: str | None = None
    canary: str | None = Field(
        default=None, description="Live now (canary share / shadow), or the last online verdict."
    )


class ModelStatus(BaseModel):
    """A registered model, its traffic plan and its versions, newest first."""

    model_name: str
    traffic: TrafficPlan | None = None
    versions: list[VersionStatus] = Field(default_factory=list)
    records_waiting: int = Field(
        default=0, description="Inference records in the servers' spool, not yet stored."
    )
    oldest_record_age_s: float | None = Field(
        default=None, description="Seconds the oldest of them has waited."
    )


# --- reading ----------------------------------------------------------------------------------


def model_status(model_name: str | None = None) -> ModelStatus:
    """Every version of a registered model, newest first, with what `VersionStatus` holds.

    Args:
        model_name: Registered model; None: ``PHI3OPS_REGISTERED_MODEL_NAME``.

    Raises:
        InvalidInputError: The name is not valid.
        RegistryError: There is no such registered model.
    """
    name = registry.resolve_model_name(model_name)
    client = registry.client()
    model = _registered_model(client, name)
    plan = read_plan(name, registry=client)
    aliases = _aliases_by_version(model)
    versions = sorted(
        registry.search_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True
    )
    backlog = read_backlog(get_settings().data_dir / "serving" / "spool")
    return ModelStatus(
        model_name=name,
        traffic=plan,
        records_waiting=backlog.waiting,
        oldest_record_age_s=backlog.oldest_age_s(),
        versions=[
            _version_status(client, mv, aliases=aliases.get(str(mv.version), []), plan=plan)
            for mv in versions
        ],
    )


def version_status(model_name: str, version: str | int) -> VersionStatus:
    """One version's status (see `VersionStatus`).

    Raises:
        RegistryError: There is no such version.
    """
    client = registry.client()
    mv = registry.get_version(model_name, version)
    if mv is None:
        raise RegistryError(
            f"{model_name!r} has no version {version}: run `phi3ops status --model-name "
            f"{model_name}` to see its versions."
        )
    model = _registered_model(client, model_name)
    aliases = _aliases_by_version(model).get(str(mv.version), [])
    return _version_status(client, mv, aliases=aliases, plan=read_plan(model_name, registry=client))


def _registered_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise RegistryError(
            f"There is no registered model {name!r} (registered: {', '.join(names) or 'none'}). "
            f"Package one first (`phi3ops package`) or pass --model-name."
        ) from exc


def _aliases_by_version(model: Any) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted((model.aliases or {}).items()):
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _version_status(
    client: Any, mv: Any, *, aliases: list[str], plan: TrafficPlan | None
) -> VersionStatus:
    tags: dict[str, str] = dict(mv.tags or {})
    repo, sha = tags.get(LineageTag.SOURCE_REPO), tags.get(LineageTag.COMMIT_SHA)
    return VersionStatus(
        version=str(mv.version),
        aliases=aliases,
        source=f"{repo}@{sha}" if repo and sha else repo,
        flavor=tags.get(LineageTag.FLAVOR),
        quantization=tags.get(LineageTag.QUANTIZATION),
        evaluation=_last_evaluation(client, tags),
        promotion=tags.get(f"{PROMOTION_TAG_PREFIX}decision"),
        promotion_reasons=reasons_of(tags),
        monitor=tags.get(f"{MONITOR_TAG_PREFIX}last_outcome"),
        monitor_run_id=tags.get(f"{MONITOR_TAG_PREFIX}last_run_id"),
        canary=_canary_state(str(mv.version), aliases, tags, plan),
    )


def _last_evaluation(client: Any, tags: dict[str, str]) -> LastEvaluation | None:
    """The newest finished run among those the version's evaluation tags point at."""
    from mlflow.exceptions import MlflowException

    found: list[LastEvaluation] = []
    for key, run_id in tags.items():
        if not key.startswith(EVALUATION_TAG_PREFIX):
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:  # deleted since: the version simply has no such evaluation
            continue
        if run.info.status != "FINISHED" or run.info.lifecycle_stage != "active":
            continue
        metrics, run_tags = run.data.metrics, run.data.tags
        found.append(
            LastEvaluation(
                run_id=run.info.run_id,
                eval_set=run_tags.get(EvalTag.EVAL_SET.value, "?"),
                eval_set_hash=run_tags.get(EvalTag.EVAL_SET_HASH.value, ""),
                started_ms=run.info.start_time or 0,
                pass_rate=metrics.get(PASS_RATE),
                latency_p95_s=metrics.get(LATENCY_P95),
                ttft_p95_s=metrics.get(TTFT_P95),
                s_per_token_p95=metrics.get(S_PER_TOKEN_P95),
                tokens_per_s=metrics.get(TOKENS_PER_S),
            )
        )
    return max(found, key=lambda e: e.started_ms, default=None)


def _canary_state(
    version: str, aliases: list[str], tags: dict[str, str], plan: TrafficPlan | None
) -> str | None:
    """``canary 10% (live)`` / ``shadow (live)`` while the plan sends it traffic, else the last
    online verdict (``promoted`` / ``aborted`` ...), else None.
    """
    in_plan = plan is not None and (
        plan.candidate_version == version
        or (plan.candidate_version is None and "candidate" in aliases)
    )
    if plan is not None and in_plan:
        live = f"canary {plan.share:.0%}" if plan.mode == "canary" else str(plan.mode)
        return f"{live} (live)"
    verdict = tags.get(f"{CANARY_TAG_PREFIX}verdict")
    if verdict:
        mode = tags.get(f"{CANARY_TAG_PREFIX}mode")
        return f"{mode} {verdict}" if mode else verdict
    return None


def reasons_of(tags: dict[str, str]) -> list[str]:
    """The version's promotion reasons, as its ``phi3ops.promotion.reasons`` tag lists them."""
    return _json_list(tags.get(f"{PROMOTION_TAG_PREFIX}reasons"))


def _json_list(value: str | None) -> list[str]:
    try:
        parsed = json.loads(value) if value else []
    except ValueError:
        return [value] if value else []
    return [str(item) for item in parsed] if isinstance(parsed, list) else [str(parsed)]


# --- the version's description ----------------------------------------------------------------


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A metric for a table cell: ``-`` when absent."""
    return "-" if value is None else format(value, spec)


def version_markdown(model_name: str, status: VersionStatus) -> str:
    """The version's description in the registry: lineage, last evaluation, promotion decision.

    Markdown, as the MLflow UI renders it on the version page. Aliases, monitoring and live
    traffic change without this version being written to, so they are left to the UI's own
    alias column and to ``phi3ops status``; what is here changes only when it is refreshed.
    """
    evaluation = status.evaluation
    lines = [
        f"**{model_name} v{status.version}**",
        "",
        f"- source: `{status.source or 'unknown'}`",
        f"- flavor: {status.flavor or 'unknown'}; quantization: {status.quantization or '-'}",
    ]
    if evaluation is None:
        lines.append("- last evaluation: none yet")
    else:
        lines.append(
            f"- last evaluation: {evaluation.eval_set} ({evaluation.eval_set_hash[:12]}), run "
            f"`{evaluation.run_id}`: pass rate {fmt(evaluation.pass_rate)}, p95 time to first "
            f"token {fmt(evaluation.ttft_p95_s)} s, p95 {fmt(evaluation.s_per_token_p95)} "
            f"s/token, {fmt(evaluation.tokens_per_s)} tokens/s"
        )
    if status.promotion:
        why = "; ".join(status.promotion_reasons)
        lines.append(f"- promotion: {status.promotion}" + (f" ({why})" if why else ""))
    else:
        lines.append("- promotion: not decided yet")
    return "\n".join(lines)


def write_decision_tags(model_name: str, version: str | int, fields: dict[str, str]) -> None:
    """Write the version's promotion decision, one ``phi3ops.promotion.<field>`` tag per field
    (each cut to fit MLflow's 5,000-character tag values), then its description: the one writer
    of a decision, whether the gates took it or a canary's verdict on live traffic.
    """
    client = registry.client()
    for field, value in fields.items():
        client.set_model_version_tag(
            model_name, str(version), f"{PROMOTION_TAG_PREFIX}{field}", value[:4900]
        )
    refresh_description(model_name, version)


def refresh_description(model_name: str, version: str | int) -> None:
    """Write `version_markdown` as the version's registry description; best effort.

    It runs right after a stage recorded something (a registration, an evaluation, a decision):
    a description that could not be written must not fail that stage, so it is logged instead.
    """
    try:
        status = version_status(model_name, version)
        registry.client().update_model_version(
            model_name, str(version), description=version_markdown(model_name, status)
        )
    except Exception:
        logger.warning(
            "Could not update the description of %s v%s", model_name, version, exc_info=True
        )
