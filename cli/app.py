"""The ``phi3ops`` command line: each command runs one flow (or the whole job) on this machine.

The commands live by group: `cli.pipeline` (the stages and the whole job) and `cli.operate`
(serving, monitoring, automations); their shared options are in `cli.options`.
"""

from __future__ import annotations

import typer

from cli import operate, pipeline

app = typer.Typer(
    help="Phi-3 from the Hugging Face hub to a governed, evaluated model in the MLflow registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

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
app.add_typer(operate.automations_app, name="automations")


if __name__ == "__main__":
    app()
