"""The `t2v` command and jobs/*.py entry points, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from t2v.cli import COMMANDS, main
from t2v.configfile import config_keys

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


def _echo(cfg):
    """A command target that returns its config (what the CLI built from the command line)."""
    return cfg.model_dump()


def test_python_m_t2v_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "t2v", "--help"], cwd=ROOT, text=True,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name, cmd in COMMANDS.items():
        assert f"  {name}" in r.stdout and cmd.help in r.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_config_lists_every_key(name, capsys):
    """Generated from the config class: every (nested, dotted) key, its type and default, the
    field's docstring, and the flag that sets it."""
    cmd = COMMANDS[name]
    assert main([*name.split(), "--help-config"]) == 0
    out = capsys.readouterr().out
    rows = config_keys(cmd.config)
    assert rows and len({k for k, *_ in rows}) == len(rows)
    for key, kind, default, doc in rows:
        assert f"  {key}: {kind} = {default}" in out, key
        assert " ".join(doc.split()[:6]) in " ".join(out.split())
    for flag, key in cmd.flags.items():
        assert f"(--{flag})" in out.split(f"  {key}: ")[1].splitlines()[0], flag


def test_help_config_types_defaults_and_docs(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert '  tracker: "tensorboard" | "mlflow" | "wandb" = "tensorboard"' in out
    assert "  optim.lr: float" in out and "  steps: int (>= 1) = 100  (--steps)" in out
    assert "  vae: str | None = null  (--vae)" in out
    assert "Micro-batch per worker." in out


def test_positional_arguments_and_switches(monkeypatch, capsys):
    """`t2v export --diffusers PKG OUT key=value`: positions fill the command's keys in order,
    the switch sets its key, and a third bare argument is a one-line error."""
    monkeypatch.setitem(COMMANDS, "export",
                        replace(COMMANDS["export"], target="tests.test_cli:_echo"))
    assert main(["export", "--diffusers", "/p/pkg", "s3://b/out", "overwrite=true"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"package": "/p/pkg", "out": "s3://b/out", "format": "diffusers",
                   "overwrite": True}
    assert main(["export", "a", "b", "c"]) == 2
    assert capsys.readouterr().err.strip() == \
        "t2v export: error: unexpected argument 'c' (settings are key=value)"
