"""The ``phi3ops`` command line: each command runs one flow (or the whole job) on this machine.

The commands live by group: `cli.pipeline` (the stages and the whole job) and `cli.operate`
(serving, monitoring, automations) and `cli.canary` (canary and shadow runs of @candidate,
their verdict); their shared options are in `cli.options`.
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

from cli import canary, operate, options, pipeline, setup, status

app = typer.Typer(
    help="Phi-3 from the Hugging Face hub to a governed, evaluated model in the MLflow registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"phi3ops {metadata.version('phi3ops')}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            envvar="PHI3OPS_VERBOSE",
            help="On failure, print the traceback too (Prefect's and ours); without it, one "
            "line and the exit code. The Prefect run logs keep the traceback either way.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    """Phi-3 from the Hugging Face hub to a governed, evaluated model in the MLflow registry."""
    options.set_verbose(verbose)  # read by `cli.options.run_job` when the command fails


for command in (
    pipeline.fetch,
    pipeline.package,
    pipeline.evaluate,
    pipeline.promote,
    pipeline.rollback,
    operate.serve,
    pipeline.run,
    pipeline.demo,
    operate.monitor,
):
    app.command()(command)
app.command()(setup.setup)
app.command()(status.status)
app.add_typer(operate.automations_app, name="automations")
app.add_typer(canary.canary_app, name="canary")


if __name__ == "__main__":
    app()
