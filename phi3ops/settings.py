"""One typed settings object for the whole project (env prefix ``PHI3OPS_``).

Reading settings touches neither disk nor network: directories are created by the code that
writes into them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from phi3ops.policies import CanaryPolicy, GatePolicy, MonitorThresholds


class _GateEnv(BaseSettings, GatePolicy):
    """`GatePolicy`'s fields read from ``PHI3OPS_GATE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PHI3OPS_GATE_", env_file=".env", extra="ignore")


class _MonitorEnv(BaseSettings, MonitorThresholds):
    """`MonitorThresholds`' fields read from ``PHI3OPS_MONITOR_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="PHI3OPS_MONITOR_", env_file=".env", extra="ignore"
    )


class _CanaryEnv(BaseSettings, CanaryPolicy):
    """`CanaryPolicy`'s fields read from ``PHI3OPS_CANARY_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="PHI3OPS_CANARY_", env_file=".env", extra="ignore")


class Settings(BaseSettings):
    """Project-wide settings, read from ``PHI3OPS_*`` environment variables (or a ``.env``)."""

    model_config = SettingsConfigDict(env_prefix="PHI3OPS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=Path(".data"),
        description=(
            "Root for hub snapshots, the embedded MLflow store (`mlflow.db`, `mlartifacts/`), "
            "build caches and `phi3ops serve`'s downloads and record spool; a relative path is "
            "taken from the working directory (give workers an absolute one)."
        ),
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
    hub_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description=(
            "Longest wait for the hub to answer one request (to connect, for each read, for "
            "each write) before the fetch fails naming the endpoint; not retried, so a silent "
            "hub fails within about this long. Overrides HF_HUB_ETAG_TIMEOUT and "
            "HF_HUB_DOWNLOAD_TIMEOUT for phi3ops fetches."
        ),
    )
    hub_max_workers: int = Field(
        default=8,
        ge=1,
        le=64,
        description=(
            "Files a fetch downloads at once (huggingface_hub's per-file download on a pool of "
            "this many threads, as snapshot_download's max_workers); 1: one after another. "
            "Each file is still verified, checked and staged on its own."
        ),
    )
    progress: bool = Field(
        default=True,
        description=(
            "Terminal progress bars on stderr (evaluation: items done and tokens/s; fetch: "
            "files and bytes), shown only when stderr is a terminal; 0 turns them off "
            "(HF_HUB_DISABLE_PROGRESS_BARS=1 also silences huggingface_hub's own). The "
            "Prefect progress artifact of an evaluation is written either way."
        ),
    )

    mlflow_tracking_uri: str | None = Field(
        default=None,
        description=(
            "MLflow tracking (and registry) URI; else MLFLOW_TRACKING_URI; else the SQLite store "
            "`sqlite:///<data dir>/mlflow.db`."
        ),
    )
    tracking_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description=(
            "How long a tracking server may take to answer the first call of a process before "
            "it fails with a one-line error naming the server."
        ),
    )
    tracking_max_retries: int = Field(
        default=3,
        ge=0,
        le=10,
        description=(
            "Retries of a failed call to a tracking server (MLflow's "
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES, whose own default of 7 waits about four minutes); "
            "an explicit MLFLOW_HTTP_REQUEST_MAX_RETRIES wins."
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

    # Promotion gates: `phi3ops.policies.GatePolicy`, each field from PHI3OPS_GATE_<FIELD>.
    gates: GatePolicy = Field(
        default_factory=lambda: GatePolicy.model_validate(_GateEnv().model_dump()),
        description="Promotion gates (PHI3OPS_GATE_*); a run may override any of them.",
    )

    # Evaluation (stage 3).
    eval_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description=(
            "Eval items generated together in one predict call (rows of one batch; the ONNX "
            "pyfunc is loaded with this max_batch_size, its KV budget still applies); a call "
            "that is refused or fails is split in halves, one that times out is not retried."
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
    eval_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Seconds the generation of one evaluation may take in all; each predict call gets "
            "the time left as its timeout (evaluation is offline work: not the 60 s a server's "
            "client gets). Unset: twice the eval set's new tokens at the speed a warm-up "
            "request measures, one row at a time, and at least 600 s."
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
        description=(
            "Store prompt and answer text in inference traces (off by default, for privacy: "
            "records then hold counts and lengths, and error messages are redacted)."
        ),
    )
    serve_max_body_bytes: int = Field(
        default=2 * 1024**2,
        ge=1024,
        description=(
            "Largest request body `phi3ops serve` reads; a larger one is answered 413 before "
            "anything is parsed."
        ),
    )
    serve_max_rows: int = Field(
        default=64,
        ge=1,
        description=(
            "Most request rows one /invocations call may carry; more is answered 413 (split "
            "the request) and recorded once."
        ),
    )
    serve_poll_s: float = Field(
        default=30.0,
        ge=0,
        description=(
            "Seconds between the checks `phi3ops serve` makes of the alias it serves; when the "
            "alias moves, the new version is loaded beside the old one and takes over new "
            "requests. 0: serve the version the alias pointed at on start, and never check."
        ),
    )
    serve_api_key_secret: str | None = Field(
        default=None,
        description=(
            "Name of a Prefect Secret block holding the API key `phi3ops serve` requires "
            "(`Authorization: Bearer <key>`); used when --api-key-env is not given. Unset: no "
            "key, unless --api-key-env names one."
        ),
    )
    serve_open_paths: list[Literal["/ping", "/health", "/ready", "/metrics"]] = Field(
        default=["/ping", "/health", "/ready", "/metrics"],
        description=(
            "Routes answered without the API key when the server requires one (a JSON list); "
            "every other route needs it. [] puts the probes and /metrics behind the key too."
        ),
    )
    serve_drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Seconds `phi3ops serve` keeps serving after SIGTERM while GET /ready answers 503, "
            "so a load balancer takes it out of rotation before it stops listening; then it "
            "drains the requests in flight. SIGINT stops waiting; another SIGTERM does not."
        ),
    )
    monitor_window_minutes: int = Field(
        default=60, ge=1, description="How far back the monitor reads inference traces."
    )
    # The suite's bounds: `phi3ops.policies.MonitorThresholds`, from PHI3OPS_MONITOR_<FIELD>.
    monitor: MonitorThresholds = Field(
        default_factory=lambda: MonitorThresholds.model_validate(_MonitorEnv().model_dump()),
        description="Monitoring thresholds (PHI3OPS_MONITOR_*); a run may override any of them.",
    )
    monitor_rollback_on_failure: bool = Field(
        default=False,
        description=(
            "`phi3ops automations apply` adds 'run the rollback deployment' to the "
            "monitoring-failed automation."
        ),
    )
    # The online verdict (`tasks.canary`): `phi3ops.policies.CanaryPolicy`, PHI3OPS_CANARY_<FIELD>.
    canary: CanaryPolicy = Field(
        default_factory=lambda: CanaryPolicy.model_validate(_CanaryEnv().model_dump()),
        description="Canary verdict thresholds (PHI3OPS_CANARY_*); a run may override any of them.",
    )
    notification_block: str = Field(
        default="phi3ops-alerts",
        description="Name of the Prefect notification block the automations notify through.",
    )
    alias_lock: Literal["auto", "file", "prefect"] = Field(
        default="auto",
        description=(
            "What serialises alias moves (promotions, rollbacks) of one model: 'prefect', a "
            "strict Prefect global concurrency limit per model (`phi3ops setup` creates it), "
            "which holds across hosts; 'file', a lock file under the data dir, which holds on "
            "one machine; 'auto', 'prefect' when PREFECT_API_URL names a Prefect server, else "
            "'file' (Prefect's temporary server has no limits to share)."
        ),
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


# --- the settings reference (docs/settings.md) ------------------------------------------------

#: The nested field sets of `Settings`: where each reads its fields from (its env prefix), and
#: how a run overrides them without touching the environment.
_FIELD_SETS: dict[str, tuple[type[BaseSettings], str]] = {
    "gates": (_GateEnv, "`--gate name=value`, or a flow's `gates` parameter"),
    "monitor": (_MonitorEnv, "`--threshold name=value`, or a flow's `thresholds` parameter"),
    "canary": (
        _CanaryEnv,
        "`phi3ops canary verdict --threshold name=value`, or the canary flow's `thresholds`",
    ),
}

#: ``PHI3OPS_*`` variables read outside `Settings`: (variable, where it is read, what it does).
#: `tests/unit/test_settings_reference.py` checks that each is still read where it says.
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        "PHI3OPS_VERBOSE",
        "cli/app.py",
        "The CLI's global `--verbose`: on failure, print the traceback too, not only the "
        "one-line error and its exit code. The Prefect run logs keep the traceback either way.",
    ),
    (
        "PHI3OPS_BENCH_CACHE",
        "bench/__main__.py",
        "Folder where `make bench` keeps the models it builds between runs (default: "
        "`.data/bench-cache` in the repository).",
    ),
    (
        "PHI3OPS_SERVE_API_KEY",
        "phi3ops/serving/auth.py",
        "The API key `phi3ops serve` hands its uvicorn workers (from `--api-key-env` or "
        "`PHI3OPS_SERVE_API_KEY_SECRET`), never on a command line; each worker removes it from "
        "its environment once read. Set it yourself only to run "
        "`uvicorn --factory phi3ops.serving.app:create_app` without the CLI.",
    ),
)

#: Other tools' variables that phi3ops reads or sets a default for: (variable, what it does here).
FOREIGN_VARIABLES: tuple[tuple[str, str], ...] = (
    (
        "HF_TOKEN",
        "Hugging Face token for gated repositories; else `PHI3OPS_HF_TOKEN_SECRET_BLOCK`.",
    ),
    ("HF_ENDPOINT", "Hub URL when `PHI3OPS_HF_ENDPOINT` is not set."),
    (
        "HF_HUB_OFFLINE",
        "`1`: fetches use a cached snapshot that re-hashes to its manifest, and fail without one.",
    ),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "`1` silences huggingface_hub's own download bars."),
    (
        "MLFLOW_TRACKING_URI",
        "Tracking and registry store when `PHI3OPS_MLFLOW_TRACKING_URI` is not set.",
    ),
    (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "When set, wins over `PHI3OPS_TRACKING_MAX_RETRIES`.",
    ),
    (
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT",
        "Default of `phi3ops serve --timeout` and of the ONNX model's `request_timeout_s` "
        "(MLflow's default: 60 s).",
    ),
    (
        "PROMETHEUS_MULTIPROC_DIR",
        "Set by `phi3ops serve --workers N` (N > 1) to a fresh folder under `<data dir>/serving`, "
        "so each worker's `/metrics` adds up every worker's (prometheus_client's multiprocess "
        "mode).",
    ),
    (
        "MLFLOW_GENAI_EVAL_MAX_WORKERS",
        "Threads of `mlflow.genai.evaluate`; evaluation uses a small number unless it is set.",
    ),
    (
        "PREFECT_API_URL",
        "The Prefect server; unset, each command starts Prefect's temporary local server. "
        "Set, `PHI3OPS_ALIAS_LOCK=auto` means `prefect`.",
    ),
    (
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
        "The CLI defaults it to 120 (the temporary server takes 13-18 s to start on 2 cores).",
    ),
)


def _cell(text: str) -> str:
    """``text`` (a description or docstring) fit for one markdown line or table cell."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type (``integer``, ``path``, ``auto | file``...)."""
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(_type_name(arg) for arg in kept)
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) is dict:
        key, value = get_args(annotation)
        return f"JSON object ({_type_name(key)} → {_type_name(value)})"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(info: FieldInfo) -> str:
    """The field's bounds (``≥ 1, ≤ 64``), from its metadata."""
    words = []
    for item in info.metadata:
        for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attribute, None)
            if value is not None:
                words.append(
                    f"{symbol} {value:,}" if isinstance(value, int) else f"{symbol} {value:g}"
                )
        if getattr(item, "min_length", None):
            words.append("not empty")
    return ", ".join(words)


def _default(name: str, info: FieldInfo) -> str:
    """The field's default as a reader writes it (``unset`` for None)."""
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        shown = str(value).lower()
    elif isinstance(value, float):
        shown = f"{value:g}"
    elif isinstance(value, dict):
        shown = json.dumps(value)
    else:
        shown = str(value)
    size = ""
    if name.endswith("_bytes") and isinstance(value, int) and value and value % 1024**2 == 0:
        size = f" ({value // 1024**2} MiB)"
    return f"`{shown}`{size}"


def _table(model: type[BaseModel], prefix: str, skip: Iterable[str] = ()) -> list[str]:
    """One markdown row per field of ``model``, each named by its variable."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            # Its default would be read from the environment: list it in _FIELD_SETS instead.
            raise TypeError(f"{model.__name__}.{name} is a field set: add it to _FIELD_SETS")
        kind = _type_name(info.annotation)
        bounds = _bounds(info)
        kind = f"{kind}, {bounds}" if bounds else kind
        rows.append(
            f"| `{prefix}{name.upper()}` | {kind} | {_default(name, info)} "
            f"| {_cell(info.description or '')} |"
        )
    return rows


def settings_reference() -> str:
    """The settings reference (``docs/settings.md``) as markdown, from the field definitions.

    It reads only the models' fields (never the environment or a ``.env``), so it is the same
    on every machine. Regenerate the file with ``make docs``.
    """
    prefix = Settings.model_config.get("env_prefix", "")
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from phi3ops/settings.py by `make docs` "
        "(python -m phi3ops.settings > docs/settings.md). Do not edit by hand: "
        "tests/unit/test_settings_reference.py fails when this file differs. -->",
        "",
        f"Every setting is an environment variable, `{prefix}` and the field name in capitals, "
        "or a line of a `.env` file in the working directory (the environment wins). A boolean "
        "takes `true`/`false` or `1`/`0`; a JSON object is written as JSON "
        "(`PHI3OPS_GATE_MIN_TAG_PASS_RATE='{\"safety\": 0.9}'`). Each process reads them once; "
        "a Prefect worker's flow runs read the worker's environment (or the work pool's "
        "`--env`, see [operations](operations.md)). The one place they are declared is "
        "`Settings` in `phi3ops/settings.py` (the field sets in `phi3ops/policies.py`).",
        "",
        "## Project settings",
        "",
        *_table(Settings, prefix, skip=_FIELD_SETS),
    ]
    for field_name, (env, overrides) in _FIELD_SETS.items():
        info = Settings.model_fields[field_name]
        field_set = info.annotation
        assert isinstance(field_set, type) and issubclass(field_set, BaseModel)
        env_prefix = env.model_config.get("env_prefix", "")
        lines += [
            "",
            f"## {(info.description or field_name).split(' (')[0]}: `{env_prefix}*`",
            "",
            _cell(field_set.__doc__ or ""),
            "",
            f"A run may override any of them: {overrides}.",
            "",
            *_table(field_set, env_prefix),
        ]
    lines += [
        "",
        "## Read outside `Settings`",
        "",
        "| variable | read in | what it does |",
        "|---|---|---|",
        *(f"| `{name}` | `{where}` | {_cell(what)} |" for name, where, what in OTHER_VARIABLES),
        "",
        "## Other tools' variables that phi3ops reads",
        "",
        "| variable | what it does here |",
        "|---|---|",
        *(f"| `{name}` | {_cell(what)} |" for name, what in FOREIGN_VARIABLES),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_reference())
