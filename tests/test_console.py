"""The demo's console: our lines reach the terminal once and clean; everything goes to the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from t2v.console import clean

SCRIPT = textwrap.dedent("""
    import os, sys
    from t2v.console import quiet
    with quiet(sys.argv[1]) as console:
        print("[t2v] starting")
        print("Token authentication is enabled for this Ray cluster.")
        print("\\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.1)\\x1b[0m [train] step 1/2 ETA 3s")
        print("\\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.1)\\x1b[0m [train] step 1/2 ETA 3s")
        print("(RayTrainWorker pid=13) /site-packages/torch/x.py:83: FutureWarning: old")
        sys.stdout.flush()
        os.write(2, b"[render] 3/3 videos | ETA 0 s\\n")  # C code and loggers write to fd 2
        os.write(1, b"[2026-12-03 06:02:14,219] [WARNING] [real_accelerator.py:213] CPU\\n")
        console.say("attribute  held-out\\ncolour  100%")
    print("after")
""")


def test_quiet_echoes_our_lines_once_and_logs_everything(tmp_path):
    log = tmp_path / "logs" / "demo.log"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "[t2v] starting", "[train] step 1/2 ETA 3s", "[render] 3/3 videos | ETA 0 s",
        "attribute  held-out", "colour  100%", "after"]
    assert run.stderr == ""
    logged = log.read_text()
    for text in ("Token authentication", "FutureWarning: old", "real_accelerator",
                 "(RayTrainWorker pid=12, ip=10.0.0.1)", "colour  100%"):
        assert text in logged, text
    assert "after" not in logged


def test_clean_strips_colour_and_ray_prefix_only():
    assert clean("\x1b[36m(RayTrainWorker pid=1, ip=1.2.3.4)\x1b[0m [t2v] x (y)\n") == "[t2v] x (y)"
    assert clean("(TrainController pid=9) [2026-12-03 06:02:11,297 E 1 2] c.cc:1: (z)") == (
        "[2026-12-03 06:02:11,297 E 1 2] c.cc:1: (z)")
    assert clean("[t2v] no prefix") == "[t2v] no prefix"
