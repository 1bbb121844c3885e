"""The online verdict: ``@candidate`` against ``@champion`` on the live traffic of one traffic plan.

While a plan (`phi3ops.traffic`) is on, the server records every request with the arm that
answered it. The verdict reads the records since the plan started, per arm:

* candidate: the ``@candidate`` version's records answered as the candidate arm (canary
  answers, and shadow copies in shadow mode);
* champion: the ``@champion`` version's records answered as the champion arm, never shadow.

and compares them (`compare_arms`):

* **error rate**: server failures (outcome ``error`` or ``shed``) among the arm's judged
  records. Client outcomes (``refused``, ``cancelled``: `CLIENT_OUTCOMES`) are counted apart
  and judge nobody; neither does a shed *shadow* copy, which is the server protecting the
  champion under load, not the candidate failing. One-sided two-proportion z-test.
* **format-failure rate** (`is_format_failure`): among served answers, those that are blank,
  leak chat-template tokens, or were cut off by ``max_tokens`` (finish reason ``length``).
  One-sided two-proportion z-test.
* **seconds per completion token**: one-sided Mann-Whitney U (candidate slower?).
* **completion tokens**: two-sided Mann-Whitney U: on the same traffic, a version whose answers
  got significantly longer or shorter behaves differently from what was evaluated and promoted.
* the monitoring **expectation suite** (`tasks.monitoring`) on each arm's records.

The verdict (`decide`): ``wait`` while either arm has fewer judged records than
``min_samples``; ``abort`` when any test says the candidate is worse at level ``alpha``, or its
suite breaks an expectation that the champion's passes on the same traffic (one both break is
the monitor's business, not a verdict on the candidate); else ``promote``. Thresholds:
`phi3ops.policies.CanaryPolicy` (``PHI3OPS_CANARY_*``).

``alpha`` is small (0.01 by default) because the verdict is taken again on a schedule: each
look at a growing window is one more chance of a false alarm, and a false ``abort`` throws a good
candidate away. Both arms are treated as independent samples; in shadow mode they answer the same
requests, whose answers tend to be alike, which makes the tests conservative rather than
optimistic.

The package: `compare` (the samples, the tests, the verdict), `judge` (the plan, the records,
the suites), `record` (the MLflow run and the version's tags). `flows/canary.py` carries the
verdict out: ``promote`` through the promotion flow, ``abort`` by clearing the plan.
"""

from tasks.canary.compare import (
    OUTCOME_OF,
    SERVER_FAILURES,
    ArmSample,
    Comparison,
    Outcome,
    Verdict,
    arm_sample,
    compare_arms,
    decide,
    is_format_failure,
    needed_samples,
    proportion_worse_pvalue,
    rank_pvalue,
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
    "Verdict",
    "arm_sample",
    "compare_arms",
    "decide",
    "end_plan",
    "end_plan_task",
    "find_target",
    "find_target_task",
    "is_format_failure",
    "judge",
    "judge_task",
    "needed_samples",
    "proportion_worse_pvalue",
    "rank_pvalue",
    "record_verdict",
    "record_verdict_task",
    "start_plan",
    "start_plan_task",
    "stop_plan",
    "suite_checks",
    "verdict_markdown",
    "verdict_metrics",
]
