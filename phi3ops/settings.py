"""One typed settings object for the whole project (env prefix ``PHI3OPS_``).

Reading settings touches neither disk nor network: directories are created by the code that
writes into them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Project-wide settings, read from ``PHI3OPS_*`` environment variables (or a ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="PHI3OPS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path(".data"),
        description="Root for snapshots, the embedded MLflow store and build caches.",
    )
    hf_endpoint: str | None = Field(
        default=None,
        description="Hub URL (a mirror, or the local hub of `make demo`); else HF_ENDPOINT.",
    )
    hf_token_secret_block: str | None = Field(
        default=None,
        description=(
            "Name of a Prefect Secret block holding the Hugging Face token; used when HF_TOKEN "
            "is not set."
        ),
    )
    disk_headroom_bytes: int = Field(
        default=256 * 1024**2,
        ge=0,
        description="Free space to keep on the target filesystem beyond what a fetch writes.",
    )

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking (and registry) URI; else MLFLOW_TRACKING_URI; else a SQLite store "
            "under the data dir."
        ),
    )
    experiment_name: str = Field(default="phi3ops", description="MLflow experiment for runs.")
    registered_model_name: str = Field(
        default="phi3-mini",
        min_length=1,
        description="Registered model that packaged versions go to.",
    )
    evals_dir: Path | None = Field(
        default=None,
        description=(
            "Folder of eval sets (<name>.jsonl) that bare set names resolve in; else the "
            "project's evals/ folder."
        ),
    )

    # Promotion gates (stage 4): absolute thresholds, then "not worse than the champion by more
    # than a margin" on the same eval set. Override per run with `phi3ops promote --gate k=v`.
    gate_min_pass_rate: float = Field(default=0.6, ge=0, le=1)
    gate_min_tag_pass_rate: dict[str, float] = Field(
        default_factory=dict, description="e.g. PHI3OPS_GATE_MIN_TAG_PASS_RATE='{\"safety\": 0.9}'"
    )
    gate_max_latency_p95_s: float = Field(default=30.0, gt=0)
    gate_min_tokens_per_s: float = Field(default=1.0, ge=0)
    gate_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    gate_max_pass_rate_drop: float = Field(default=0.02, ge=0, le=1)
    gate_max_latency_increase: float = Field(default=0.25, ge=0)
    gate_max_tokens_per_s_drop: float = Field(default=0.25, ge=0, le=1)
    gate_max_error_rate_increase: float = Field(default=0.02, ge=0, le=1)

    # Evaluation (stage 3).
    eval_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description=(
            "Eval items generated together in one predict call (rows of one batch); a failing "
            "batch is retried row by row."
        ),
    )
    eval_default_max_tokens: int = Field(
        default=128,
        ge=1,
        le=4096,
        description="New tokens per eval item that sets no max_tokens of its own.",
    )
    eval_ttft_samples: int = Field(
        default=5,
        ge=0,
        description=(
            "Eval items streamed one by one to measure time to first token (0: skip); only "
            "flavors with predict_stream (the ONNX pyfunc) can be measured."
        ),
    )
    judge_endpoint: str | None = Field(
        default=None,
        description=(
            "Model URI of an LLM judge for mlflow.genai's built-in judges (RelevanceToQuery, "
            "Safety), e.g. 'gateway:/judge' or 'openai:/gpt-4o-mini'. Unset (the default): no "
            "judge runs and the evaluation never leaves this machine."
        ),
    )

    # Monitoring (stage 5): inference records are MLflow traces; the suite's thresholds.
    inference_experiment_name: str = Field(
        default="phi3ops-inference",
        min_length=1,
        description="MLflow experiment that `phi3ops serve` writes one trace per request row to.",
    )
    record_prompts: bool = Field(
        default=False,
        description="Store the prompt text in inference traces (off by default, for privacy).",
    )
    monitor_window_minutes: int = Field(
        default=60, ge=1, description="How far back the monitor reads inference traces."
    )
    monitor_min_records: int = Field(
        default=20,
        ge=1,
        description="Fewer records than this in the window is 'insufficient data', not a pass.",
    )
    monitor_min_response_chars: int = Field(default=1, ge=0)
    monitor_max_response_chars: int = Field(default=16000, ge=1)
    monitor_max_length_finish_rate: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Highest share of answers cut off by max_tokens (finish_reason 'length').",
    )
    monitor_max_latency_p95_s: float = Field(default=30.0, gt=0, description="Latency SLO, p95.")
    monitor_max_error_rate: float = Field(default=0.05, ge=0, le=1)
    monitor_max_drift_ratio: float = Field(
        default=2.0,
        gt=1,
        description=(
            "Drift bound: the window's median completion tokens must lie within [baseline / r, "
            "baseline * r] and its median seconds per token below baseline * r, where the "
            "baseline is the champion's evaluation on the default eval set."
        ),
    )
    monitor_rollback_on_failure: bool = Field(
        default=False,
        description=(
            "`phi3ops automations apply` adds 'run the rollback deployment' to the "
            "monitoring-failed automation."
        ),
    )
    notification_block: str = Field(
        default="phi3ops-alerts",
        description="Name of the Prefect notification block the automations notify through.",
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def snapshots_dir(self) -> Path:
        """Where fetched hub snapshots live: ``<data_dir>/snapshots/<org>--<name>/<sha>``."""
        return self.data_dir / "snapshots"

    @property
    def cache_dir(self) -> Path:
        """Build caches (tiny Phi-3, ONNX builds), keyed by recipe hashes."""
        return self.data_dir / "cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache with ``get_settings.cache_clear()``."""
    return Settings()
