"""Entry points: the ``phi3ops`` command line (`cli.app`) and the jobs it runs (`cli.jobs`)."""
