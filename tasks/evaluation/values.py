"""The values the evaluation stages hand each other (and return to callers)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: Eval set hashes are shown, and tag model versions, by their first characters.
HASH_PREFIX_LENGTH = 12

#: Why an item has no answer: the model refused its call before any work (HTTP 429), the call
#: ran past its timeout or the evaluation's deadline (HTTP 504), or anything else failed.
Failure = Literal["refused", "timed_out", "failed"]
REFUSED: Failure = "refused"
TIMED_OUT: Failure = "timed_out"
FAILED: Failure = "failed"
FAILURES: tuple[Failure, ...] = (REFUSED, TIMED_OUT, FAILED)


class ItemGeneration(BaseModel):
    """What the model answered to one eval item, and what it cost."""

    id: str
    content: str | None  # None when the request failed
    error: str | None = None
    failure: Failure | None = None  # set with error
    latency_s: float  # wall time of the predict call the row was part of
    batch_size: int  # rows in that call
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class Generation(BaseModel):
    """Every item's answer, and the speed of producing them."""

    items: list[ItemGeneration]
    wall_s: float  # all predict calls, back to back
    ttft_s: list[float] = Field(default_factory=list)
    peak_rss_mb: float | None = None
    deadline_s: float | None = None  # what the whole generation was allowed
    notes: list[str] = Field(default_factory=list)


class EvalSummary(BaseModel):
    """One recorded evaluation: a model version on an eval set (identified by its hash)."""

    run_id: str
    model_name: str
    version: str
    model_uri: str
    flavor: str
    eval_set: str
    eval_set_hash: str
    metrics: dict[str, float]
    tag_pass_rates: dict[str, float]
    notes: list[str] = Field(default_factory=list)
    reused: bool = False

    @property
    def pass_rate(self) -> float | None:
        """The overall pass rate."""
        return self.metrics.get("pass_rate")


class ChampionLookup(BaseModel):
    """The evaluation a candidate is compared with, or why there is none."""

    alias: str
    version: str | None = None
    summary: EvalSummary | None = None
    reason: str | None = None  # set when summary is None
