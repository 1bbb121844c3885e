"""``python -m cli``: the ``phi3ops`` command line."""

from cli.app import app

app()
