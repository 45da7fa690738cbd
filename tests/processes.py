"""Driving a process from a test: run it until its output says enough, then kill it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def kill_9_when(script: Path, args: list[str], ready: Callable[[str], bool]) -> None:
    """Run `script` with `args` and kill -9 it once a line of its output is `ready`
    (or it ends)."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if ready(line):
                break
        proc.kill()
    finally:
        proc.wait()
        proc.stdout.close()
