"""The `t2v` command and jobs/*.py entry points, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def t2v(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2v.cli", *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=300)


def test_synth_command_with_flags_and_overrides(tmp_path):
    out = tmp_path / "ds"
    cfg = tmp_path / "synth.yaml"
    cfg.write_text("num: 5\nframes: 5\nsize: 16\n")
    r = t2v("data", "synth", "--config", str(cfg), "--out", str(out), "shard_size=2",
            "--seed", "4")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["samples"] == 5 and result["shards"] == 3
    index = json.loads((out / "_index.json").read_text())
    assert index["seed"] == 4 and index["total"] == 5
    resolved = (out / "synth_config.yaml").read_text()
    assert "shard_size: 2" in resolved and "num: 5" in resolved


def test_config_error_is_one_line_and_exit_2(tmp_path):
    r = t2v("data", "synth", "--out", str(tmp_path), "nmu=3")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err == ["t2v data synth: error: defaults + overrides: nmu: unknown key"]


def test_unknown_command():
    r = t2v("bogus")
    assert r.returncode == 2 and "usage: t2v" in r.stderr


def test_job_entry_point_refuses_relative_output_under_ray_job(tmp_path):
    env = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}  # what `ray job submit` sets for its driver
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "pack.py"), "--src", str(tmp_path),
                        "--out", "relative/out"], cwd=tmp_path, text=True, capture_output=True,
                       env={**os.environ, **env}, timeout=120)
    assert r.returncode == 2
    assert "relative" in r.stderr and "absolute path or an s3:// URI" in r.stderr
