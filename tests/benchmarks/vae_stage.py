"""The demo's VAE stage alone, re-trained on a finished demo run's clips with overrides, and
scored as the demo's eval scores it: a VAE recipe tried in ~17 minutes instead of a whole
`--long` run's ~40.

    .venv/bin/python tests/benchmarks/vae_stage.py --run RUN --out DIR [vae.KEY=VALUE ...]

RUN is a `t2v demo` output directory (its config.yaml, data/train and data/heldout). The
stage is the demo's own: its resolved `vae` section with the overrides (the demo's KEY=VALUE
syntax, e.g. `vae.steps=2400 vae.ckpt_every=1200 vae.val_every=1200`), trained by the same
`run_train` (Ray Train + DeepSpeed, a local Ray of the demo's logical CPUs) into DIR/runs, so
nothing of RUN changes. Scored with the eval's own `model_metrics` on RUN's held-out clips:
mean and minimum PSNR, compression. Prints a markdown row (seconds of the stage, validation
PSNR at each validation step, held-out PSNR, the machine) and writes DIR/vae_stage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.bench_model import matmul_peak  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished `t2v demo` output directory")
    ap.add_argument("--out", required=True, help="where the stage's run goes (DIR/runs)")
    ap.add_argument("overrides", nargs="*", help="demo overrides, vae.KEY=VALUE")
    args = ap.parse_args()

    import ray

    from t2v.config import DemoConfig, EvalConfig
    from t2v.configfile import load_config
    from t2v.eval.report import model_metrics
    from t2v.runtime import ensure_ray
    from t2v.train.trainer import run_train

    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    bad = [o for o in args.overrides if not o.startswith("vae.")]
    if bad:
        raise SystemExit(f"vae_stage.py: only vae.KEY=VALUE overrides (got {' '.join(bad)})")
    demo = load_config(DemoConfig, str(run / "config.yaml"), args.overrides)
    vae = demo.vae.model_copy(update={"out": str(out / "runs")})
    out.mkdir(parents=True, exist_ok=True)
    gflops = [one_thread_gflops()]
    ensure_ray(None, num_cpus=demo.num_cpus or max(4, os.cpu_count() or 1))  # as the demo
    try:
        start = time.perf_counter()
        run_train(vae)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    gflops.append(one_thread_gflops())
    package = out / "runs" / vae.name / "package"
    m = model_metrics(EvalConfig(model=str(package), heldout=str(run / "data" / "heldout"),
                                 heldout_clips=demo.heldout_clips))
    val, batch = {}, None
    for line in (out / "runs" / vae.name / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("event") == "start":  # the global batch the run trained with
            batch = row["global_batch"]
        if "psnr" in row.get("val", {}):
            val[int(row["step"])] = round(float(row["val"]["psnr"]), 2)
    result = {"run": str(run), "overrides": args.overrides, "seconds": round(seconds, 1),
              "steps": vae.steps, "batch": batch,
              "val_psnr": val, "psnr_db": m["vae"]["psnr_db"],
              "psnr_db_min": m["vae"]["psnr_db_min"], "heldout_clips": m["heldout_clips"],
              "compression": m["vae"]["compression_ratio"],
              "machine": describe(), "matmul_gflops_1thread": [round(g, 1) for g in gflops]}
    (out / "vae_stage.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| overrides | steps x batch | stage s | validation PSNR | held-out PSNR (min) |")
    print("|---|---|---|---|---|")
    print(f"| `{' '.join(args.overrides) or '(the profile)'}` | {vae.steps} x {result['batch']} "
          f"| {seconds:.0f} | {', '.join(f'{v} @{s}' for s, v in val.items())} "
          f"| **{m['vae']['psnr_db']:.2f} dB** ({m['vae']['psnr_db_min']:.2f}), "
          f"n={m['heldout_clips']} |")
    print(f"\n{describe()}; fp32 matmul one thread {gflops[0]:.1f} -> {gflops[1]:.1f} GFLOP/s")


def one_thread_gflops() -> float:
    """fp32 2048x2048 matmul GFLOP/s on one thread: how fast the box is this hour."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_peak() / 1e9
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
