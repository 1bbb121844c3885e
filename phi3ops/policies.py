"""The field sets that decide things: promotion gates, monitoring thresholds and the online
(canary) verdict's thresholds.

Each is declared once, here, with its defaults, bounds and descriptions. Settings read them from
``PHI3OPS_GATE_*`` / ``PHI3OPS_MONITOR_*`` / ``PHI3OPS_CANARY_*``; flows take their "overrides"
form (every field optional) as typed parameters, so the Prefect UI renders a form; the CLI's
``--gate`` and ``--threshold`` fill the same overrides.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self, TypeVar, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from phi3ops.errors import InvalidInputError

Policy = TypeVar("Policy", bound="_Policy")


class _Policy(BaseModel):
    """A field set with defaults; ``with_overrides`` applies a run's changes, checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    #: What the CLI and error messages call it ("gate", "monitoring threshold").
    noun: ClassVar[str]

    def with_overrides(self: Policy, overrides: dict[str, Any] | BaseModel | None) -> Policy:
        """A copy with ``overrides`` (field name -> value, or an overrides model) applied.

        Raises:
            InvalidInputError: An unknown name, or a value out of its field's bounds.
        """
        if isinstance(overrides, BaseModel):
            overrides = overrides.model_dump(exclude_none=True)
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(type(self).model_fields))
        if unknown:
            raise InvalidInputError(
                f"Unknown {self.noun}(s) {', '.join(unknown)}: use any of "
                f"{', '.join(type(self).model_fields)}."
            )
        try:
            return type(self).model_validate(self.model_dump() | overrides)
        except ValidationError as exc:
            raise invalid_input(exc, what=f"{self.noun}s") from exc


class GatePolicy(_Policy):
    """Promotion gates: absolute thresholds on the candidate's evaluation, then "not worse than
    the champion by more than a margin" on the same eval set.
    """

    noun: ClassVar[str] = "gate"

    min_pass_rate: float = Field(default=0.6, ge=0, le=1, description="Minimum overall pass rate.")
    min_tag_pass_rate: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict,
        description='Minimum pass rate per eval-set tag, e.g. {"safety": 0.9}.',
    )
    max_ttft_p95_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: maximum p95 time to first token, seconds (streamed samples; "
            "PHI3OPS_EVAL_TTFT_SAMPLES). Empty (the default): not checked."
        ),
    )
    max_s_per_token_p95: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: maximum p95 seconds per output token (each item's latency over its "
            "completion tokens). Empty (the default): not checked."
        ),
    )
    max_latency_p95_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: maximum p95 whole-request latency, seconds; it grows with max_tokens "
            "and batching, not only the model's speed: prefer max_ttft_p95_s and "
            "max_s_per_token_p95. Empty (the default): not checked."
        ),
    )
    min_tokens_per_s: float = Field(
        default=1.0, ge=0, description="Minimum output tokens per second."
    )
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Maximum share of failed requests (0-1)."
    )
    max_pass_rate_drop: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Against the champion: pass rates may drop at most this much (absolute).",
    )
    max_ttft_increase: float = Field(
        default=0.25,
        ge=0,
        description=(
            "Against the champion: p95 time to first token may grow by this fraction at most "
            "(checked when both were measured: flavors that stream)."
        ),
    )
    max_s_per_token_increase: float = Field(
        default=0.25,
        ge=0,
        description="Against the champion: p95 seconds per output token may grow by this "
        "fraction at most.",
    )
    max_latency_increase: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Against the champion: p95 whole-request latency may grow by this fraction at most. "
            "Empty (the default): not checked (the TTFT and per-token margins are)."
        ),
    )
    max_tokens_per_s_drop: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Against the champion: tokens/s may drop by this fraction at most.",
    )
    max_error_rate_increase: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Against the champion: the error rate may rise this much at most (absolute).",
    )


class MonitorThresholds(_Policy):
    """The monitoring suite's bounds on a window of inference records."""

    noun: ClassVar[str] = "monitoring threshold"

    min_records: int = Field(
        default=20,
        ge=1,
        description="Fewer records than this in the window is 'insufficient data', not a pass.",
    )
    min_response_chars: int = Field(
        default=1, ge=0, description="Shortest acceptable answer, characters."
    )
    max_response_chars: int = Field(
        default=16000, ge=1, description="Longest acceptable answer, characters."
    )
    max_length_finish_rate: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Highest share of answers cut off by max_tokens (finish_reason 'length').",
    )
    max_ttft_p95_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: p95 time to first token, seconds (streamed calls record it). Empty "
            "(the default): not checked; the model's speed is watched against its own "
            "evaluation (drift-seconds-per-token), as the gates compare it with the champion's."
        ),
    )
    max_s_per_token_p95: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: p95 seconds per output token (each call's latency over its completion "
            "tokens). Empty (the default): not checked."
        ),
    )
    max_latency_p95_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Optional SLO: p95 whole-call latency, seconds; it grows with max_tokens, queueing "
            "and the machine, not only the model: prefer max_ttft_p95_s and "
            "max_s_per_token_p95. Empty (the default): not checked."
        ),
    )
    max_error_rate: float = Field(
        default=0.05, ge=0, le=1, description="Highest share of failed requests (0-1)."
    )
    max_drift_ratio: float = Field(
        default=2.0,
        gt=1,
        description=(
            "Drift bound: the window's median completion tokens must lie within [baseline / r, "
            "baseline * r] and its median seconds per token below baseline * r, where the "
            "baseline is the version's evaluation on the default eval set."
        ),
    )
    max_psi: float = Field(
        default=0.25,
        gt=0,
        description=(
            "Highest population stability index of the window's prompt and completion token "
            "counts against the evaluation's per-item sample (bins at the sample's quantiles); "
            "guards against the traffic's mix shifting away from what was evaluated."
        ),
    )
    min_ks_pvalue: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description=(
            "Lowest two-sample Kolmogorov-Smirnov p-value of the window's prompt tokens, "
            "completion tokens (two-sided) and seconds per token (one-sided: slower) against "
            "the evaluation's sample; guards against distributions that no longer match it."
        ),
    )
    min_drift_samples: int = Field(
        default=20,
        ge=2,
        description=(
            "Fewest values per side (evaluation and window) for PSI and KS; with fewer, those "
            "checks are 'not run' rather than judged on noise."
        ),
    )

    @model_validator(mode="after")
    def _answer_length_range(self) -> Self:
        if self.min_response_chars > self.max_response_chars:
            raise ValueError(
                f"min_response_chars={self.min_response_chars} is above max_response_chars="
                f"{self.max_response_chars}: every answer would fail; lower it or raise the max"
            )
        return self


class CanaryPolicy(_Policy):
    """The online verdict on ``@candidate`` against ``@champion`` on live traffic
    (`tasks.canary`): how many records each arm needs, and how sure a "worse" must be.
    """

    noun: ClassVar[str] = "canary threshold"

    min_samples: int = Field(
        default=100,
        ge=2,
        le=1_000_000,
        description=(
            "Fewest records per arm (server-judged: client refusals and cancellations, and "
            "shadow copies the server shed, do not count) before a verdict; with fewer, the "
            "verdict is 'wait'."
        ),
    )
    alpha: float = Field(
        default=0.01,
        gt=0,
        le=0.2,
        description=(
            "Significance level of each one-sided 'candidate worse' test (error rate, format "
            "failures, seconds per token; completion length two-sided). Small, because the "
            "verdict is re-checked on a schedule: every look is another chance of a false alarm."
        ),
    )


def overrides_model(policy: type[_Policy], name: str) -> type[BaseModel]:
    """``policy``'s fields, each optional (empty keeps the value in settings): a run's overrides.

    Derived, not declared, so the bounds and descriptions stay those of ``policy``.
    """
    fields: dict[str, Any] = {}
    for field_name, info in policy.model_fields.items():
        # Field() is typed as returning its default; at runtime it returns a FieldInfo.
        optional = cast(
            FieldInfo,
            Field(
                default=None,
                description=f"{info.description} Empty: the value in settings.",
            ),
        )
        optional.metadata = list(info.metadata)  # the bounds (ge, le, gt)
        # pydantic requires an annotation on every field, so model_fields always carry one.
        assert info.annotation is not None
        fields[field_name] = (info.annotation | None, optional)
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"{policy.noun.capitalize()}s to change for this run; an empty field keeps "
        f"the value in settings.",
        __module__=__name__,
        **fields,
    )


#: A run's gate changes (flow parameter, ``--gate``).
GateOverrides = overrides_model(GatePolicy, "GateOverrides")
#: A run's monitoring threshold changes (flow parameter, ``--threshold``).
ThresholdOverrides = overrides_model(MonitorThresholds, "ThresholdOverrides")
#: A run's canary threshold changes (flow parameter, ``phi3ops canary verdict --threshold``).
CanaryOverrides = overrides_model(CanaryPolicy, "CanaryOverrides")


def invalid_input(exc: ValidationError, *, what: str | None = None) -> InvalidInputError:
    """A pydantic validation error as one line per problem, naming the field."""
    problems = []
    for error in exc.errors():
        where = ".".join(map(str, error["loc"]))
        message = error["msg"].removeprefix("Value error, ").rstrip(".")
        problems.append(f"{where}: {message}" if where else message)
    return InvalidInputError(f"Invalid {what or exc.title}: {'; '.join(problems)}.")
