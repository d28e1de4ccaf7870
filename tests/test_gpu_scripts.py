"""The Ray-free GPU scripts stay runnable between the sessions that have a GPU: each one's CPU
path runs here, in-process (the 2026-12-04 H200 run found gpu_bench_dit.py's by-path import
broken since dit.py began importing rope.py, besides a library bug: LoRA init from a CPU
generator into CUDA tensors)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks"


def run_script(name: str, argv: list[str], monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / name), run_name="__main__")
        raise SystemExit(0)  # scripts whose main() returns None
    assert done.value.code in (0, None)


def test_gpu_check_reference_then_check_on_cpu(debug_run, tmp_path, monkeypatch, capsys):
    """The CPU reference of a trained package, then the comparison run against it on the CPU:
    every measure present, every difference zero (same device, same code)."""
    ref, out = tmp_path / "ref.pt", tmp_path / "check.json"
    run_script("gpu_check.py", ["reference", "--package", debug_run.package, "--out", str(ref)],
               monkeypatch)
    run_script("gpu_check.py", ["check", "--package", debug_run.package, "--ref", str(ref),
                                "--device", "cpu", "--out", str(out)], monkeypatch)
    got = json.loads(out.read_text())
    assert got["failed"] == []
    assert set(got["render"]) == {"euler", "heun", "dpm_solver_2m", "unipc"}
    for r in got["render"].values():
        assert r["fp32_latent_rel"] == 0.0 and r["bf16_video_psnr"] == float("inf")
    assert got["train"]["fp32_loss"] == got["train"]["cpu_loss"] > 0
    assert got["train"]["fp32_grad_cos"] == pytest.approx(1.0, abs=1e-5)
    assert got["vae"] == {"vae_fp32_rel": 0.0, "vae_tiled_rel": 0.0}
    assert "all checks within LIMITS" in capsys.readouterr().out


def test_gpu_check_vae_scale_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "vae.json"
    run_script("gpu_check.py", ["vae-scale", "--device", "cpu", "--preset", "debug", "--frames",
                                "5", "--size", "32x48", "--tile", "16", "--chunk", "1",
                                "--out", str(out)], monkeypatch)
    ways = json.loads(out.read_text())["ways"]
    assert set(ways) == {"whole", "chunk", "tile", "chunk+tile"}
    assert all(w["shape"] == [1, 3, 5, 32, 48] for w in ways.values())


@pytest.mark.parametrize("script", ["gpu_bench_dit.py", "gpu_bench_lora.py"])
def test_gpu_benches_dry_run(script, tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    run_script(script, ["--dry-run", "--out", str(out)], monkeypatch)
    assert json.loads(out.read_text())
