"""Driving a process from a test: run it until its output says enough, then kill it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable


def kill_9_when(args: list[str], ready: Callable[[str], bool]) -> None:
    """Run Python with `args` (a script and its arguments, or -m and a module) and
    kill -9 it once a line of its output is `ready` (or it ends)."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if ready(line):
                break
        proc.kill()
    finally:
        proc.wait()
        proc.stdout.close()
