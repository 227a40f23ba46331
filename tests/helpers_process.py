"""Shared helper for the kill-and-resume tests of both trainers."""

import signal
import subprocess
import time
from pathlib import Path


def kill_at_first_checkpoint(cmd: list[str], run: Path, env: dict, timeout: float = 120.0) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``run/checkpoint.pth`` exists (or after ``timeout``)."""
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + timeout
    while not (run / "checkpoint.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
