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
