"""Every name phi3ops writes somewhere others read it: registry aliases, tag keys, Prefect event
names, artifact names and keys, metric names.

One module, so that a flow, a task, an automation and a test can agree on a string without
importing each other.
"""

from __future__ import annotations

import re
from enum import StrEnum

# --- registry aliases -------------------------------------------------------------------------

#: The alias every newly registered version gets; evaluation and promotion start from it.
CANDIDATE_ALIAS = "candidate"
#: The version in production; promotion moves it, evaluation compares against it.
CHAMPION_ALIAS = "champion"
#: The champion before the current one; rollback restores it.
PREVIOUS_ALIAS = "previous"

# --- tag keys ---------------------------------------------------------------------------------

#: Every tag phi3ops writes starts with this.
TAG_PREFIX = "phi3ops."


class LineageTag(StrEnum):
    """Tag keys on packaging runs, logged models and registered versions."""

    SOURCE_REPO = f"{TAG_PREFIX}source_repo"
    SOURCE_REVISION = f"{TAG_PREFIX}source_revision"
    COMMIT_SHA = f"{TAG_PREFIX}commit_sha"
    MANIFEST_DIGEST = f"{TAG_PREFIX}manifest_digest"
    VARIANT = f"{TAG_PREFIX}variant"
    FLAVOR = f"{TAG_PREFIX}flavor"
    QUANTIZATION = f"{TAG_PREFIX}quantization"
    WRAPPER_VERSION = f"{TAG_PREFIX}wrapper_version"
    PIP_REQUIREMENTS_DIGEST = f"{TAG_PREFIX}pip_requirements_digest"
    PACKAGE_KEY = f"{TAG_PREFIX}package_key"


class EvalTag(StrEnum):
    """Tag keys on evaluation runs (what was evaluated, on which eval set)."""

    MODEL_NAME = f"{TAG_PREFIX}model_name"
    MODEL_VERSION = f"{TAG_PREFIX}model_version"
    MODEL_URI = f"{TAG_PREFIX}model_uri"
    EVAL_SET = f"{TAG_PREFIX}eval_set"
    EVAL_SET_HASH = f"{TAG_PREFIX}eval_set_hash"
    FLAVOR = f"{TAG_PREFIX}flavor"
    NOTES = f"{TAG_PREFIX}eval_notes"


#: Run tag saying what kind of run it is (``promotion``, ``monitor``).
RUN_TYPE_TAG = f"{TAG_PREFIX}run_type"
#: Trace tag naming the eval item a trace scores (set through the evaluation data's ``tags``).
ITEM_ID_TAG = f"{TAG_PREFIX}item_id"
ITEM_TAGS_TAG = f"{TAG_PREFIX}item_tags"
#: Model version tag prefix: ``phi3ops.eval.<first 12 of the eval set hash>`` = run id.
EVALUATION_TAG_PREFIX = f"{TAG_PREFIX}eval."
#: Model version tag prefix of the promotion decision (``phi3ops.promotion.decision``, ...).
PROMOTION_TAG_PREFIX = f"{TAG_PREFIX}promotion."
#: Model version and monitor-run tag prefix (``phi3ops.monitor.last_outcome``, ...).
MONITOR_TAG_PREFIX = f"{TAG_PREFIX}monitor."
ROLLED_BACK_AT_TAG = f"{TAG_PREFIX}rolled_back_at"
RESTORED_BY_ROLLBACK_TAG = f"{TAG_PREFIX}restored_by_rollback"
#: An alias change in progress: on the registered model, ``{"id", "op", "version"}``; on that
#: version, the whole plan. The next alias change of the model finishes it first.
INTENT_TAG = f"{TAG_PREFIX}intent"
#: Registered-model tag: the fencing token of the alias lock's latest holder (``<n> <holder>``,
#: ``n`` one more at each acquisition); a holder writes only while it is still its own.
LOCK_TOKEN_TAG = f"{TAG_PREFIX}lock_token"
#: Run tag tying a promotion decision run to its intent (one run per intent).
INTENT_ID_TAG = f"{TAG_PREFIX}intent_id"
#: Model version tag, ``pending`` from registration until the version holds ``@candidate``.
REGISTRATION_TAG = f"{TAG_PREFIX}registration"
#: Run tag: the process that started the run (``host:pid``), to tell an orphan from a live run.
OWNER_TAG = f"{TAG_PREFIX}owner"

#: Inference traces: the served model's registered name and version, the root span, the record.
MODEL_NAME_TAG = f"{TAG_PREFIX}model_name"
MODEL_VERSION_TAG = f"{TAG_PREFIX}model_version"
#: Inference traces: the arm that answered (``champion`` / ``candidate``) and whether the answer
#: was a shadow copy the client never saw (``true`` / ``false``).
ARM_TAG = f"{TAG_PREFIX}arm"
SHADOW_TAG = f"{TAG_PREFIX}shadow"
#: Registered-model tag: the live-traffic plan every server follows (`phi3ops.traffic`).
TRAFFIC_TAG = f"{TAG_PREFIX}traffic"
#: Model version tag prefix of the online (canary / shadow) verdicts (``phi3ops.canary.verdict``).
CANARY_TAG_PREFIX = f"{TAG_PREFIX}canary."
RECORD_SPAN_NAME = f"{TAG_PREFIX}inference"
RECORD_ATTRIBUTE = f"{TAG_PREFIX}record"

# --- Prefect events (automations react to these) ----------------------------------------------

PROMOTED_EVENT = "phi3ops.model.promoted"
REJECTED_EVENT = "phi3ops.model.rejected"
ROLLED_BACK_EVENT = "phi3ops.model.rolled-back"
#: A scheduled re-evaluation of the champion: still passing its gates, or regressed.
REEVALUATED_EVENT = "phi3ops.model.re-evaluated"
REGRESSED_EVENT = "phi3ops.model.regressed"
MONITORING_PASSED_EVENT = "phi3ops.monitoring.passed"
MONITORING_FAILED_EVENT = "phi3ops.monitoring.failed"
MONITORING_INSUFFICIENT_DATA_EVENT = "phi3ops.monitoring.insufficient-data"
#: The online verdict on a candidate taking live traffic: promoted, or taken out of traffic.
CANARY_PROMOTED_EVENT = "phi3ops.canary.promoted"
CANARY_ABORTED_EVENT = "phi3ops.canary.aborted"
#: The resource every model event is about: ``phi3ops.model.<name>.<version>``.
MODEL_RESOURCE_PREFIX = "phi3ops.model."


def model_resource_id(model_name: str, version: str) -> str:
    """The Prefect resource id of one model version (the resource of its events)."""
    return f"{MODEL_RESOURCE_PREFIX}{model_name}.{version}"


#: Prefect global concurrency limit (one slot) that every alias move of a model runs under
#: when a Prefect server is configured: ``phi3ops-aliases-<model>``.
ALIAS_LIMIT_PREFIX = "phi3ops-aliases-"


def alias_limit_name(model_name: str) -> str:
    """The name of the Prefect global concurrency limit guarding ``model_name``'s aliases."""
    return f"{ALIAS_LIMIT_PREFIX}{model_name}"


# --- MLflow artifacts of an evaluation run ----------------------------------------------------

TABLE_ARTIFACT = "eval_items.json"
PLOT_ARTIFACT = "eval_plot.png"
COMPARISON_ARTIFACT = "comparison.md"

# --- metric names the evaluation logs and the gates read --------------------------------------

PASS_RATE = "pass_rate"
TAG_PASS_RATE_PREFIX = "pass_rate."
LATENCY_P95 = "latency_p95_s"
#: Time to first token, p95 of the streamed samples (seconds).
TTFT_P95 = "ttft_p95_s"
#: Seconds per output token, p95 over the items (each item's latency / its completion tokens).
S_PER_TOKEN_P95 = "s_per_token_p95"
TOKENS_PER_S = "tokens_per_s"
ERROR_RATE = "error_rate"

# --- Prefect artifact keys --------------------------------------------------------------------


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts`` (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def evaluation_artifact_key(model_name: str, version: str) -> str:
    """The Prefect artifact key of a version's evaluation: ``eval-<model>-<version>``."""
    return artifact_key("eval", model_name, version)


def lifecycle_artifact_key(model_name: str) -> str:
    """The Prefect artifact key of a lifecycle run's summary: ``lifecycle-summary-<model>``."""
    return artifact_key("lifecycle-summary", model_name)


# --- MLflow logged models ---------------------------------------------------------------------


def logged_model_name(repo_id: str, flavor: str, quantization: str = "") -> str:
    """The display name of a logged model in MLflow's UI: the source repository's name, then
    what it was packaged as (``phi-3-mini-4k-instruct-onnx-int4``,
    ``phi-3-mini-4k-instruct-transformers``).

    Sanitised like `artifact_key`, since MLflow rejects ``/ : . % " '`` in the name. Only the
    first word of ``quantization`` is kept (``int4`` of ``int4-rtn-block-32-acc-level-4``); a
    flavor the repository's name already ends with is not repeated. Nothing looks a model up by
    this name: MLflow addresses logged models by id (``models:/<model_id>``).
    """
    name = artifact_key(repo_id.rsplit("/", 1)[-1])
    kind = artifact_key(str(flavor))
    precision = artifact_key(quantization).split("-", 1)[0]
    repeated = name == kind or name.endswith(f"-{kind}")
    return artifact_key(name, "" if repeated else kind, precision)
