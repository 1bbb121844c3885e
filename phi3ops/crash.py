"""Crash points and process ownership: how registry changes are proven to survive a crash.

`crash_point` marks a moment inside a multi-step change (between two registry writes). When
``PHI3OPS_CRASH_AT`` names that point, the process dies there at once (``os._exit(137)``, as if
killed: no ``finally``, no cleanup), so a test can check that the next run of the same command
finishes the change. Otherwise it costs one environment lookup.

`owner` and `owner_is_gone` tell an orphan from a live run: runs record who started them
(``host:pid``), and a run still RUNNING whose process is gone on this host was left by a crash.
"""

from __future__ import annotations

import os
import socket
import sys

#: The environment variable naming the crash point to die at (tests only).
CRASH_AT_ENV = "PHI3OPS_CRASH_AT"
#: The exit status of a crashed process, as after ``kill -9``.
CRASH_EXIT_CODE = 137


def crash_point(name: str) -> None:
    """Die here, without any cleanup, when ``PHI3OPS_CRASH_AT`` is ``name``; else do nothing.

    Args:
        name: ``<operation>.<moment>``, e.g. ``promote.after-aliases``.
    """
    if os.environ.get(CRASH_AT_ENV) == name:
        sys.stderr.write(f"phi3ops: crashing at {name} ({CRASH_AT_ENV})\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)


def owner() -> str:
    """This process, as ``host:pid``: recorded on runs to recognise them as orphans later."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_gone(recorded: str | None) -> bool:
    """Whether the process ``recorded`` by `owner` has ended.

    Only a process of this host can be checked; one on another host (or an unreadable record)
    counts as alive, so a live run elsewhere is never taken for an orphan.
    """
    host, _, pid = (recorded or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
