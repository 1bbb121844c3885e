"""``phi3ops status``: one table of a registered model's versions (`tasks.status` reads it).

The table is drawn with rich (typer's own dependency); MLflow is imported inside the command,
so ``phi3ops --help`` stays instant.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cli.options import ModelNameOption, run_job

if TYPE_CHECKING:
    from rich.table import Table

    from tasks.status import ModelStatus


def status(model_name: ModelNameOption = None) -> None:
    """Show a registered model's versions: aliases, source@sha, flavor, last evaluation (pass
    rate, p95 latency, tokens/s), last promotion decision and monitoring outcome, canary state.
    """
    from rich.console import Console

    from tasks.status import model_status  # lazy: MLflow

    found = run_job(model_status, model_name=model_name)
    console = Console()
    console.print(status_table(found))
    if found.traffic is None:
        console.print("Live traffic: @champion answers every request (no canary or shadow).")
    else:
        plan = found.traffic
        share = f" {plan.share:.0%}" if plan.mode == "canary" else ""
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(plan.since))
        console.print(
            f"Live traffic: {plan.mode}{share} to @candidate (version "
            f"{plan.candidate_version or '-'}) since {since}, plan {plan.id[:8]}."
        )


def status_table(found: ModelStatus) -> Table:
    """The versions of ``found`` as a rich table, newest first."""
    from rich import box
    from rich.table import Table

    from tasks.status import fmt

    # No vertical rules: eleven columns need the room on an 80-column terminal.
    table = Table(title=f"{found.model_name}: {len(found.versions)} version(s)", box=box.SIMPLE)
    # Numbers never wrap; on a narrow terminal the other cells wrap at their words and the
    # source (one long word) folds.
    table.add_column("v", no_wrap=True)
    table.add_column("aliases")
    table.add_column("source", overflow="fold")
    table.add_column("flavor")
    table.add_column("last evaluation")
    for column in ("pass", "p95 s", "tok/s"):
        table.add_column(column, justify="right", no_wrap=True)
    for column in ("promotion", "monitor", "canary"):
        table.add_column(column)
    for v in found.versions:
        evaluation = v.evaluation
        source = v.source or "-"
        repo, _, sha = source.partition("@")
        table.add_row(
            v.version,
            " ".join(f"@{alias}" for alias in v.aliases) or "-",
            f"{repo}@{sha[:12]}" if sha else source,
            v.flavor or "-",
            f"{evaluation.eval_set} ({evaluation.run_id[:8]})" if evaluation else "-",
            fmt(evaluation.pass_rate) if evaluation else "-",
            fmt(evaluation.latency_p95_s) if evaluation else "-",
            fmt(evaluation.tokens_per_s) if evaluation else "-",
            v.promotion or "-",
            v.monitor or "-",
            v.canary or "-",
        )
    return table
