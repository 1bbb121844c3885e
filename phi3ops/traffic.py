"""Live traffic between ``@champion`` and ``@candidate``: the plan every server follows.

A registered model carries at most one traffic plan, as the registered-model tag
``phi3ops.traffic`` (JSON). Without one, ``@champion`` answers everything. With one:

- ``canary``: a ``share`` of requests is answered by the candidate. A request with an OpenAI
  ``user`` is sticky: the same user always gets the same arm for the whole canary (the user is
  hashed with the plan's id, so each canary draws its own users).
- ``shadow``: ``@champion`` answers every request; each is also sent to ``@candidate`` in the
  background, whose answer is recorded and never reaches the client.

The plan pins the candidate: ``candidate_version``, the version that passed every gate against
``champion_version`` on the eval set ``eval_set_hash`` (checked when the plan starts). Servers
serve that version as the candidate arm, whatever ``@candidate`` names later; a plan without
one gives the candidate no traffic.

The plan is set by ``phi3ops canary start`` (and flows), cleared by ``phi3ops canary stop`` and
by the online verdict; each server worker looks at it as often as at its aliases, so a change
takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phi3ops.errors import InvalidInputError
from phi3ops.names import TRAFFIC_TAG
from phi3ops.registry import client


class TrafficMode(StrEnum):
    """How ``@candidate`` takes part in live traffic."""

    CANARY = "canary"
    SHADOW = "shadow"


class Arm(StrEnum):
    """Which alias answered a request."""

    CHAMPION = "champion"
    CANDIDATE = "candidate"


#: The canary share when none is given.
DEFAULT_CANARY_SHARE = 0.1
#: A canary share as a typed parameter (flows' UI forms show its bounds).
CanaryShare = Annotated[float, Field(gt=0, lt=1)]


class TrafficPlan(BaseModel):
    """One canary or shadow run of a registered model (see the module docstring)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: TrafficMode = Field(description="canary: a share answered by @candidate; shadow: a copy.")
    share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Canary only: the share of requests @candidate answers (0.1 = 10%).",
    )
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="This plan's id.")
    since: float = Field(
        default_factory=time.time, description="When it started, seconds since the epoch."
    )
    candidate_version: str | None = Field(
        default=None,
        description="The version that takes part: @candidate when the plan started, gated "
        "against the champion. Servers serve it, whatever @candidate names later.",
    )
    champion_version: str | None = Field(
        default=None, description="The champion its gates compared it with."
    )
    eval_set_hash: str | None = Field(
        default=None, description="The eval set (content hash) its gates passed on."
    )
    streams_to_champion: bool = Field(
        default=False,
        description="The candidate cannot stream (transformers flavor): streamed requests stay "
        "with @champion and count for neither arm.",
    )

    @model_validator(mode="after")
    def _share_fits_mode(self) -> Self:
        if self.mode is TrafficMode.CANARY and not 0 < self.share < 1:
            raise ValueError(
                f"share={self.share}: a canary needs a share between 0 and 1 (e.g. 0.1 for 10%)"
            )
        if self.mode is TrafficMode.SHADOW and self.share:
            raise ValueError("share applies to canary mode only: shadow copies every request")
        return self

    @classmethod
    def start(
        cls,
        mode: TrafficMode | str,
        *,
        share: float | None = None,
        candidate_version: str | None = None,
        champion_version: str | None = None,
        eval_set_hash: str | None = None,
        streams_to_champion: bool = False,
    ) -> TrafficPlan:
        """A new plan, checked.

        Raises:
            InvalidInputError: An unknown mode, or a share that does not fit it.
        """
        try:
            mode = TrafficMode(mode)
        except ValueError as exc:
            raise InvalidInputError(
                f"traffic mode {mode!r} is unknown: use {', '.join(m.value for m in TrafficMode)}."
            ) from exc
        if share is None:
            share = DEFAULT_CANARY_SHARE if mode is TrafficMode.CANARY else 0.0
        if mode is TrafficMode.CANARY and not 0 < share < 1:  # before pydantic's own words
            raise InvalidInputError(
                f"share={share:g}: a canary needs a share between 0 and 1 (e.g. 0.1 for 10%)."
            )
        try:
            return cls(
                mode=mode,
                share=share,
                candidate_version=candidate_version,
                champion_version=champion_version,
                eval_set_hash=eval_set_hash,
                streams_to_champion=streams_to_champion,
            )
        except ValidationError as exc:
            raise InvalidInputError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from exc

    def arm_for(self, user: str | None, *, rng: random.Random | None = None) -> Arm:
        """The arm that answers a request from ``user`` (None: drawn at random)."""
        if self.mode is not TrafficMode.CANARY:
            return Arm.CHAMPION
        draw = sticky_fraction(user, salt=self.id) if user else (rng or random).random()
        return Arm.CANDIDATE if draw < self.share else Arm.CHAMPION

    def to_tag(self) -> str:
        """The registered-model tag value."""
        return self.model_dump_json()

    @classmethod
    def from_tag(cls, value: str | None) -> TrafficPlan | None:
        """The plan a tag value holds; None for none (or one this version cannot read)."""
        if not value:
            return None
        try:
            return cls.model_validate(json.loads(value))
        except (ValueError, ValidationError):
            return None


def sticky_fraction(user: str, *, salt: str) -> float:
    """A number in [0, 1) fixed for ``user`` within one plan (``salt``), uniform across users."""
    digest = hashlib.sha256(f"{salt}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def read_plan(model_name: str, *, registry: Any | None = None) -> TrafficPlan | None:
    """The traffic plan of ``model_name``; None when there is none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        model = (registry or client()).get_registered_model(model_name)
    except MlflowException:
        return None
    return TrafficPlan.from_tag(model.tags.get(TRAFFIC_TAG))


def write_plan(model_name: str, plan: TrafficPlan) -> None:
    """Make ``plan`` the traffic plan of ``model_name`` (replacing any other)."""
    client().set_registered_model_tag(model_name, TRAFFIC_TAG, plan.to_tag())


def clear_plan(model_name: str) -> None:
    """``@champion`` answers everything again (nothing happens when there is no plan)."""
    from mlflow.exceptions import MlflowException

    try:
        client().delete_registered_model_tag(model_name, TRAFFIC_TAG)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
