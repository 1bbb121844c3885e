"""``phi3ops status``: a registered model's versions (`tasks.status` reads them).

One table, when the terminal is wide enough for it without wrapping a cell; on a narrower one
(80 columns, say) one block of a few labelled lines per version, which rich folds to the
width. The width is the terminal's, or ``COLUMNS`` (rich reads it, as `shutil.get_terminal_size`
does). Drawn with rich (typer's own dependency); MLflow is imported inside the command, so
``phi3ops --help`` stays instant.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cli.options import ModelNameOption, run_job

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
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
    console.print(status_view(found, console))
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
    if found.records_waiting:
        console.print(
            f"Inference records: {found.records_waiting} waiting in the servers' spool for the "
            f"store, the oldest for {found.oldest_record_age_s or 0:.0f} s (a canary verdict "
            "waits for them)."
        )
    else:
        console.print("Inference records: none waiting for the store.")


def status_view(found: ModelStatus, console: Console) -> RenderableType:
    """`status_table` when it fits ``console`` without wrapping a cell, else `status_blocks`."""
    table = status_table(found)
    # Its natural width: measured against the console's own width, it would never exceed it.
    natural = console.measure(table, options=console.options.update_width(_UNBOUNDED)).maximum
    return table if natural <= console.width else status_blocks(found)


#: Wider than any table of versions: measured against it, a table gets its natural width.
_UNBOUNDED = 100_000


def status_blocks(found: ModelStatus) -> RenderableType:
    """The versions of ``found`` for a narrow terminal, newest first: per version, a heading
    (number and aliases) and labelled lines (source and flavor, last evaluation, promotion,
    and the monitoring outcome and live traffic when there are any), folded to the width
    rather than cut.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from tasks.status import fmt

    parts: list[RenderableType] = [
        Text(f"{found.model_name}: {len(found.versions)} version(s), newest first", style="bold")
    ]
    for v in found.versions:
        aliases = " ".join(f"@{alias}" for alias in v.aliases)
        parts += [Text(""), Text(f"v{v.version}  {aliases}".rstrip(), style="bold")]
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(overflow="fold")
        evaluation = v.evaluation
        grid.add_row("  source", f"{_source(v.source)} ({v.flavor or '?'})")
        grid.add_row(
            "  evaluation",
            (
                f"{evaluation.eval_set} ({evaluation.run_id[:8]}): pass "
                f"{fmt(evaluation.pass_rate)} · p95 {fmt(evaluation.latency_p95_s)} s · "
                f"{fmt(evaluation.tokens_per_s)} tok/s"
            )
            if evaluation
            else "none yet",
        )
        grid.add_row("  promotion", v.promotion or "not decided yet")
        if v.monitor:
            grid.add_row("  monitor", v.monitor)
        if v.canary:
            grid.add_row("  traffic", v.canary)  # canary 10% (live), shadow (live), aborted...
        parts.append(grid)
    return Group(*parts)


def _source(source: str | None) -> str:
    """``repo@sha`` with the sha cut to 12 characters; ``-`` when unknown."""
    repo, _, sha = (source or "-").partition("@")
    return f"{repo}@{sha[:12]}" if sha else repo


def status_table(found: ModelStatus) -> Table:
    """The versions of ``found`` as a rich table, newest first."""
    from rich import box
    from rich.table import Table

    from tasks.status import fmt

    # No vertical rules: eleven columns need the room (`status_view` uses it only where it fits).
    table = Table(title=f"{found.model_name}: {len(found.versions)} version(s)", box=box.SIMPLE)
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
        table.add_row(
            v.version,
            " ".join(f"@{alias}" for alias in v.aliases) or "-",
            _source(v.source),
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
