"""Run a test script as N local processes, one per rank (`python SCRIPT RANK ARGS...`), as the
tests of collectives over gloo do; fails with the last of each rank's stderr if any rank fails,
and kills the ranks still running when it gives up (the timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_ranks(script: Path, n: int, *args: object, env: dict | None = None,
              timeout: float = 300) -> None:
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(n)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:  # a rank stuck in a collective (its peer died, or the timeout): none left behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for _, e in outs)
