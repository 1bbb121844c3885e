"""The command line: ``python -m offline.local_hub --repo org/name=FOLDER`` serves folders.

Kept out of ``__main__.py`` so the package can re-export :func:`main` without importing its own
``__main__`` module (``runpy`` warns when ``python -m`` finds it already imported).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from offline.local_hub.server import LocalHub

__all__ = ["main"]


def _repo_arg(value: str) -> tuple[str, Path]:
    repo_id, sep, folder = value.partition("=")
    if not sep or not repo_id or not folder:
        raise argparse.ArgumentTypeError(f"expected REPO_ID=FOLDER, got {value!r}")
    return repo_id, Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve folders as hub repos until Ctrl-C or SIGTERM.

    Prints ``HF_ENDPOINT=<url>`` as the first line on stdout, then one line per repo on stderr.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m offline.local_hub",
        description="Serve local folders as Hugging Face hub model repos on 127.0.0.1.",
    )
    parser.add_argument(
        "--repo",
        action="append",
        type=_repo_arg,
        required=True,
        metavar="REPO_ID=FOLDER",
        help="serve FOLDER as REPO_ID@main; repeat a REPO_ID to stack commits",
    )
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    parser.add_argument(
        "--gated", action="append", default=[], metavar="REPO_ID", help="gate this repo's files"
    )
    parser.add_argument(
        "--allow-token", action="append", default=[], metavar="TOKEN", help="token for gated repos"
    )
    parser.add_argument(
        "--no-copy", action="store_true", help="serve files in place instead of copying them"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    try:
        hub = LocalHub(port=args.port)
    except OSError as error:
        print(f"local hub: cannot listen on port {args.port}: {error}", file=sys.stderr)
        return 1
    with hub:
        try:
            for repo_id, folder in args.repo:
                sha = hub.add_repo(
                    repo_id, folder, gated=repo_id in args.gated, copy=not args.no_copy
                )
                print(f"local hub: {repo_id}@main = {sha} ({folder})", file=sys.stderr)
        except (ValueError, OSError) as error:
            print(f"local hub: {error}", file=sys.stderr)
            return 2
        for token in args.allow_token:
            hub.allow_token(token)
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        print("local hub: serving; Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0
