"""Evaluate a registered model version on a versioned eval set: quality, speed, and a comparison.

What one evaluation does, in order:

1. **Resolve** the model URI (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) to a
   registry version, failing with `InvalidInputError` before any work when it does not exist.
2. **Generate** (`generate_outputs`): every item's ``llm/v1/chat`` request goes through the model
   loaded with ``mlflow.pyfunc.load_model`` (either flavor; the ONNX pyfunc with its
   ``max_batch_size`` set to the eval batch size), several rows per ``predict`` call, alone in
   memory (`tasks.loaded_models`: what packaging or an earlier evaluation loaded is freed
   first, and this model is released after). Rows of one call share their generation fields
   (MLflow's transformers flavor applies the first row's ``max_tokens`` to every row), so
   batches are formed per ``max_tokens``. Evaluation is offline work with a deadline that
   covers it (`evaluation_deadline_s`: twice the set's tokens at the warm-up's measured speed,
   or ``PHI3OPS_EVAL_TIMEOUT_S``); each call gets the time left as its ``timeout_s``, so the
   pyfunc's admission does not refuse it and its 60 s request timeout does not cut it. A call
   that is refused or raises is split in halves (a refusal costs no work; one bad item sinks
   only the calls holding it); one that times out is not retried; an item that still fails is
   recorded once with its error and kind (``refused``, ``timed_out``, ``failed``). Speed is
   measured here: a row's latency is its call's wall time; output tokens/s
   is all completion tokens over the wall time of all calls; peak memory is the process's RSS
   high-water mark during generation; time to first token streams a few items one by one
   through ``predict_stream`` (the ONNX pyfunc streams; MLflow's transformers pyfunc does not,
   which is recorded as a note).
3. **Score** (`score_generation`): ``mlflow.genai.evaluate`` runs one code scorer per
   expectation kind (each wrapping `phi3ops.evalset.check`) over the precomputed outputs (no
   ``predict_fn``: generation, the slow part, stays batched here), inside an MLflow run this
   stage starts, so everything lands in that one run: a trace per item with its verdicts and
   expectations as assessments, ``<kind>/mean`` metrics (each scorer's pass rate over the items
   that have that expectation), plus this package's metrics, params, tags, the per-item table,
   a plot, the comparison, and the eval set as the run's dataset input (its name, digest =
   the start of its content hash). The version gets the tag ``phi3ops.eval.<hash[:12]>`` =
   run id, and its registry description is rewritten (`tasks.status`).
4. **Compare** (`comparison_markdown`) with the evaluation of ``@champion`` on the *same* eval
   set (same content hash) and nothing else.

Optional LLM judges (mlflow.genai's ``RelevanceToQuery`` and ``Safety``) join the scorers only
when ``PHI3OPS_JUDGE_ENDPOINT`` names a judge model; by default nothing leaves the machine.

Metrics of a run (`EvalSummary.metrics`):

====================  ===============================================================
``pass_rate``         items whose every expectation passed / items (failed requests fail)
``pass_rate.<tag>``   the same over the items carrying the tag
``<kind>/mean``       scorer pass rate over the items having that expectation kind
``error_rate``        failed requests / items (with ``n_items``, ``n_errors``; of those,
                      ``n_refused`` and ``n_timed_out``: zero when the deadline covers the work)
``latency_p50_s``     per-request latency percentiles (``latency_p95_s`` too); a batched
                      row's latency is its batch's wall time (``batch_size_mean``)
``ttft_p50_s``        time to first token through streaming (``ttft_samples`` measured;
                      ``ttft_p95_s`` too, gated against the champion)
``s_per_token_p95``   per-item seconds per output token, p95 (``s_per_token_p50`` too):
                      latency / completion tokens (TTFT is not measured per batched row, so
                      it is not subtracted); gated against the champion
``tokens_per_s``      completion tokens / generation wall time (``completion_tokens``,
                      ``generation_wall_s``, and the deadline it had, ``generation_deadline_s``)
``peak_rss_mb``       RSS high-water mark of the process during generation
====================  ===============================================================

Modules, each importing only those above it: `values` (what the stages hand each other),
`resolve` (the model, the eval set, recorded evaluations), `generate`, `compare`, and `score`
(scoring, recording, and the whole evaluation in-process, `evaluate_model`); `shards` fans
generation out over the work pool and merges it back (imported from its module, not here).
"""

from tasks.evaluation.compare import (
    ComparisonRow,
    comparison_markdown,
    comparison_rows,
    parity_report,
    publish_comparison,
    publish_comparison_task,
)
from tasks.evaluation.generate import (
    completion_text,
    evaluation_line,
    generate_for,
    generate_outputs,
    generate_task,
    plan_batches,
)
from tasks.evaluation.resolve import (
    evaluation_tag_key,
    find_champion_evaluation,
    find_champion_evaluation_task,
    find_evaluation,
    find_evaluation_task,
    load_eval_set_task,
    load_model,
    resolve_model_task,
)
from tasks.evaluation.score import (
    evaluate_model,
    expectation_scorers,
    judge_scorers,
    run_evaluation_parameters,
    score_generation,
    score_task,
)
from tasks.evaluation.values import ChampionLookup, EvalSummary, Generation, ItemGeneration

__all__ = [
    "ChampionLookup",
    "ComparisonRow",
    "EvalSummary",
    "Generation",
    "ItemGeneration",
    "comparison_markdown",
    "comparison_rows",
    "completion_text",
    "evaluate_model",
    "evaluation_line",
    "evaluation_tag_key",
    "expectation_scorers",
    "find_champion_evaluation",
    "find_champion_evaluation_task",
    "find_evaluation",
    "find_evaluation_task",
    "generate_for",
    "generate_outputs",
    "generate_task",
    "judge_scorers",
    "load_eval_set_task",
    "load_model",
    "parity_report",
    "plan_batches",
    "publish_comparison",
    "publish_comparison_task",
    "resolve_model_task",
    "run_evaluation_parameters",
    "score_generation",
    "score_task",
]
