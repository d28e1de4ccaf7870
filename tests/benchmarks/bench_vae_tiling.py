"""Peak memory of decoding one video with our VAE: whole, chunked in time, tiled in space, both.

    .venv/bin/python tests/benchmarks/bench_vae_tiling.py [--preset base] [--frames 33]
        [--size 256] [--tile 144] [--out runs/bench/vae_tiling.json]

Each way runs in its own process (fp32, CPU, torch's default threads): peak
RSS sampled every 5 ms minus the RSS before decoding, with the VAE built (random weights: the
memory and time do not depend on them) and the latents made before. The output video itself
(3 x frames x size^2 fp32) is part of every peak. Tiled vs whole agreement is measured on a
trained VAE in tests/test_vae.py, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_memory import SAMPLER  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402

DECODE = SAMPLER + textwrap.dedent("""
    import json, sys, time, torch
    preset, frames, size, tile, chunk = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         int(sys.argv[4]), int(sys.argv[5]))
    from t2v.models.tiling import Tiling
    from t2v.models.vae import CausalVideoVAE, vae_config
    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config(preset)).eval()
    z = torch.randn(1, vae.config.latent_channels, *vae.latent_shape(frames, size, size)[1:])
    tiling = Tiling(tile // vae.config.spatial_down) if tile else None
    peak = Peak()
    base = peak.rss()
    peak.start()
    t0 = time.time()
    with torch.no_grad():
        out = vae.decode(z, chunk_latent_frames=chunk or None, tiling=tiling)
    seconds = time.time() - t0
    top = peak.stop() - base
    print("RESULT" + json.dumps({"peak": top, "seconds": seconds, "output": out.numel() * 4,
                                 "shape": list(out.shape)}))
""")

WAYS = {"whole": (0, 0), "chunked (1 latent frame)": (0, 1), "tiled": (1, 0),
        "tiled + chunked": (1, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tile", type=int, default=144,
                    help="tile side in pixels (144 of 256: 2 x 2 tiles)")
    ap.add_argument("--out", default="runs/bench/vae_tiling.json")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gib, rows = 2**30, {}
    for name, (tiled, chunk) in WAYS.items():
        r = subprocess.run([sys.executable, "-c", DECODE, args.preset, str(args.frames),
                            str(args.size), str(args.tile if tiled else 0), str(chunk)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
        if r.returncode or not lines:
            raise RuntimeError(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
        rows[name] = json.loads(lines[0][6:])
        print(f"{name}: peak {rows[name]['peak'] / gib:.2f} GiB, "
              f"{rows[name]['seconds']:.1f} s", flush=True)
    whole = rows["whole"]["peak"]
    cpu = describe()
    print(f"\n{args.preset} VAE, {args.frames}x{args.size}x{args.size}, tiles of {args.tile} px, "
          f"fp32, {cpu} (output video "
          f"{rows['whole']['output'] / gib:.2f} GiB)\n")
    print("| decode | peak RSS over baseline | vs whole | seconds |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak'] / gib:.2f} GiB | {r['peak'] / whole:.2f}x | "
              f"{r['seconds']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu, "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
