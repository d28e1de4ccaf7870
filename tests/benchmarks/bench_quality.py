"""Quality benchmark: `t2v demo` (default or --long) timed from its start, its held-out scores
against the bars of issue [5/7], as a markdown block for BENCHMARKS.md.

    .venv/bin/python tests/benchmarks/bench_quality.py [--long] [--out DIR] [--keep] [KEY=VALUE ...]

The demo runs as a subprocess exactly as the README's command runs it (`t2v demo`), with a fresh
output directory, so nothing is resumed; installation is not timed (the .venv exists). The wall
time is the subprocess's, Ray start-up included. Prints a markdown block (bars, achieved,
pass/fail, per-stage seconds, the machine with its fp32 matmul speed before and after,
measured by bench_model.py's `matmul_peak`) and writes it to OUT/bench_quality.md. KEY=VALUE
arguments go to `t2v demo` as they are (`vae.scale_weight=0.25`): a variant of the profile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.machine import describe  # noqa: E402

BARS = {
    "default": {"minutes": 10, "colour": 0.90, "motion": 0.85, "shape": 0.70, "psnr": 28.0,
                "compression": 24.0},
    "long": {"minutes": 45, "colour": 0.95, "motion": 0.90, "shape": 0.85, "psnr": 32.0,
             "compression": 24.0},
}


def machine(gflops: tuple[float, float]) -> str:
    """The box, with its fp32 matmul speed before and after the demo: boxes of one kind
    drift by 2x between days (151-381 GFLOP/s in numpy on one Xeon), so a time is quoted with
    the box's speed."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return (f"{describe()}, torch fp32 matmul {gflops[0]:.0f} GFLOP/s before / "
            f"{gflops[1]:.0f} after, load avg at end {load:.1f}")


def run(profile: str, out: Path, overrides: list[str]) -> tuple[float, dict, dict]:
    cmd = [sys.executable, "-m", "t2v.cli", "demo", "--out", str(out)]
    if profile != "default":
        cmd.append(f"--{profile}")
    cmd += overrides
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                        "DS_ACCELERATOR": "cpu"}
    t0 = time.time()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo failed (exit {proc.returncode}); log: {log}")
    summary = json.loads((out / "demo_summary.json").read_text())
    report = json.loads((out / "eval" / "report.json").read_text())
    return wall, summary, report


def markdown(profile: str, wall: float, summary: dict, report: dict,
             gflops: tuple[float, float]) -> str:
    bar = BARS[profile]
    attrs, model = report["attributes"], report["model"]
    vae = model["vae"]

    def row(name: str, got: str, want: str, ok: bool) -> str:
        return f"| {name} | {got} | {want} | {'met' if ok else '**missed**'} |"

    lines = [f"`t2v demo{'' if profile == 'default' else ' --' + profile}` "
             f"({machine(gflops)}):", "",
             "| measure | achieved | bar | |", "|---|---|---|---|",
             row("wall time", f"{wall / 60:.1f} min", f"<= {bar['minutes']} min",
                 wall <= bar["minutes"] * 60)]
    for attr in ("colour", "motion", "shape"):
        a = attrs[attr]
        lo, hi = a["wilson95"]
        lines.append(row(f"{attr} accuracy (held-out, n={a['n']})",
                         f"{a['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]", f">= {bar[attr]:.0%}",
                         a["accuracy"] >= bar[attr]))
    lines.append(row("VAE PSNR (held-out clips)", f"{vae['psnr_db']:.2f} dB",
                     f">= {bar['psnr']:.0f} dB", vae["psnr_db"] >= bar["psnr"]))
    lines.append(row("VAE compression", f"{vae['compression_ratio']:.1f}x",
                     f">= {bar['compression']:.0f}x",
                     vae["compression_ratio"] >= bar["compression"]))
    lines.append(row("held-out flow loss / untrained", f"{model['flow_loss_ratio']:.2f}",
                     "< 0.8 (CI test)", model["flow_loss_ratio"] < 0.8))
    stages = ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items())
    lines += ["", f"Stage seconds: {stages}. Render: "
              f"{report['render'].get('videos_per_s', float('nan')):.2f} videos/s. "
              f"Count accuracy {attrs.get('count', {}).get('accuracy', float('nan')):.1%}."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", action="store_true")
    p.add_argument("--out", help="output dir (default: a temp dir, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="passed to `t2v demo`")
    args = p.parse_args()
    profile = "long" if args.long else "default"
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="t2v-bench-quality-"))
    out = base / f"demo-{profile}"
    shutil.rmtree(out, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)  # the log goes beside `out`
    from bench_model import matmul_peak  # noqa: PLC0415 - torch: only once the args are read

    before = matmul_peak() / 1e9
    wall, summary, report = run(profile, out, args.overrides)
    text = markdown(profile, wall, summary, report, (before, matmul_peak() / 1e9))
    (base / f"bench_quality_{profile}.md").write_text(text + "\n")
    print(text)
    if not args.out and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
