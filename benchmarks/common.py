"""What the benchmark scripts share: the repository root and running one `python -m lit_safety` command."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], log: str, threads: int | None = None) -> float:
    """Run ``python -m lit_safety <args>`` from the repository root with its output in ``log``;
    returns the wall seconds, or stops the benchmark when the command fails. ``threads`` sets the
    command's torch threads (OMP_NUM_THREADS), so that commands run side by side share the cores."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "lit_safety", *args], check=False, cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"`lit_safety {' '.join(args[:3])}` failed; see {log}")
    return time.perf_counter() - start
