"""The online verdict: ``@candidate`` against ``@champion`` on the live traffic of one traffic plan.

While a plan (`phi3ops.traffic`) is on, the server records every request with the arm that
answered it. The verdict reads the records since the plan started, per arm:

* candidate: the ``@candidate`` version's records answered as the candidate arm (canary
  answers, and shadow copies in shadow mode);
* champion: the ``@champion`` version's records answered as the champion arm, never shadow.

and compares them (`compare_arms`) on what the model did, never on what a client chose. Arms
share the traffic only by chance, and a client can learn and steer its arm (arms are sticky by
``user``), so every comparison is made **within strata** of the request's own choices
(`stratum_of`: its exact ``max_tokens``, whether it gave ``stop``, whether it streamed) and
strata one arm lacks say nothing: ``max_tokens=1`` requests sent to one arm compare only with
``max_tokens=1`` requests of the other.

* **error rate**: server failures (outcome ``error`` or ``shed``) among the arm's judged
  records. Client outcomes (``refused``, ``cancelled``: `CLIENT_OUTCOMES`) are counted apart
  and judge nobody; neither does a shed *shadow* copy, which is the server protecting the
  champion under load, not the candidate failing.
* **format-failure rate** (`is_format_failure`): among served answers, those that are blank
  (unless they ended on the client's own ``stop``) or leak chat-template tokens.
* **length-finish rate** (`is_length_finish`): served answers cut off by ``max_tokens``.
* these three rates: one-sided Cochran-Mantel-Haenszel test over the strata.
* **seconds per completion token**: one-sided van Elteren test (Mann-Whitney U within strata,
  combined), the strata also split by prompt size (`prompt_size`).
* **completion tokens**: two-sided van Elteren test: on the same requests, a version whose
  answers got significantly longer or shorter behaves differently from what was evaluated.
* the monitoring **expectation suite** (`tasks.monitoring`) on each arm's judged records,
  matched (`matched_records`) so that both arms hold the same mix of strata.

The verdict (`decide`): ``wait`` while either arm has fewer judged records in the strata both
arms have than ``min_samples``; ``abort`` when any test says the candidate is worse at level
``alpha``, or its suite breaks an expectation that the champion's passes on the same mix of
requests (one both break is the monitor's business, not a verdict on the candidate); else
``promote``. Thresholds:
`phi3ops.policies.CanaryPolicy` (``PHI3OPS_CANARY_*``).

``alpha`` is small (0.01 by default) because the verdict is taken again on a schedule: each
look at a growing window is one more chance of a false alarm, and a false ``abort`` throws a good
candidate away. Both arms are treated as independent samples; in shadow mode they answer the same
requests, whose answers tend to be alike, which makes the tests conservative rather than
optimistic.

The package: `compare` (the samples, the tests, the verdict), `judge` (the plan, the records,
the suites), `record` (the MLflow run and the version's tags). `flows/canary.py` carries the
verdict out: ``promote`` through the promotion flow, ``abort`` by clearing the plan; either
way the candidate's promotion decision, reasons and description then say so (`tag_outcome`).
"""

from tasks.canary.compare import (
    OUTCOME_OF,
    SERVER_FAILURES,
    ArmSample,
    Comparison,
    Outcome,
    Stratum,
    StratumCounts,
    Verdict,
    arm_sample,
    cmh_worse_pvalue,
    comparable_judged,
    compare_arms,
    decide,
    is_format_failure,
    is_judged,
    is_length_finish,
    matched_records,
    needed_samples,
    prompt_size,
    proportion_worse_pvalue,
    rank_pvalue,
    stratified_rank_pvalue,
    stratum_of,
)
from tasks.canary.judge import (
    CanaryReport,
    CanaryTarget,
    end_plan,
    end_plan_task,
    find_target,
    find_target_task,
    judge,
    judge_task,
    suite_checks,
    tag_outcome,
    tag_outcome_task,
)
from tasks.canary.record import (
    record_verdict,
    record_verdict_task,
    verdict_markdown,
    verdict_metrics,
)
from tasks.canary.start import start_plan, start_plan_task, stop_plan

__all__ = [
    "OUTCOME_OF",
    "SERVER_FAILURES",
    "ArmSample",
    "CanaryReport",
    "CanaryTarget",
    "Comparison",
    "Outcome",
    "Stratum",
    "StratumCounts",
    "Verdict",
    "arm_sample",
    "cmh_worse_pvalue",
    "comparable_judged",
    "compare_arms",
    "decide",
    "end_plan",
    "end_plan_task",
    "find_target",
    "find_target_task",
    "is_format_failure",
    "is_judged",
    "is_length_finish",
    "judge",
    "judge_task",
    "matched_records",
    "needed_samples",
    "prompt_size",
    "proportion_worse_pvalue",
    "rank_pvalue",
    "record_verdict",
    "record_verdict_task",
    "start_plan",
    "start_plan_task",
    "stop_plan",
    "stratified_rank_pvalue",
    "stratum_of",
    "suite_checks",
    "tag_outcome",
    "tag_outcome_task",
    "verdict_markdown",
    "verdict_metrics",
]
