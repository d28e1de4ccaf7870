"""Run a test script as N local processes, one per rank (`python SCRIPT RANK ARGS...`), as the
tests of collectives over gloo do; fails with the last of each rank's stderr if any rank fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_ranks(script: Path, n: int, *args: object, env: dict | None = None,
              timeout: float = 300) -> None:
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for _, e in outs)
