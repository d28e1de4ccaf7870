"""Sampler quality at few steps: each sampler's distance to a many-step reference solution.

    .venv/bin/python tests/benchmarks/bench_samplers.py [--model PKG] [--shift S] [--ref-steps N]

Without --model the velocity is the exact field of a 1-D Gaussian mixture per element
(`mixture_velocity` in tests/test_unipc.py), at shifts 1 and 3; with --model it is a trained
package's DiT under classifier-free guidance (the package's render shift and cfg, else 1 and
4.0), on eight shapes-demo prompts at the package's geometry, and the videos are decoded too.
The reference is Heun with --ref-steps steps on t2v's schedule, from the same noise. Rows:
euler, heun, dpm_solver_2m and unipc on t2v's schedule (`get_schedule`), and "unipc (Wan)":
`denoise(sampler="unipc")`, i.e. diffusers' UniPC schedule with integer model timesteps, what
an imported Wan package renders. Calls are velocity evaluations (each one batched CFG forward).
Error: RMS of the final latents' difference to the reference, relative to the reference's RMS;
with --model also the PSNR (dB) of the decoded videos against the reference's.
Prints a markdown table (and writes it with --out).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t2v.diffusion.sampling import SAMPLERS, cfg_velocity, get_noise, get_schedule  # noqa: E402
from t2v.diffusion.unipc import diffusers_flow_schedule, unipc  # noqa: E402
from t2v.models.package import read_meta  # noqa: E402
from t2v.render.model import RenderModel  # noqa: E402
from tests.benchmarks.bench_quality import machine  # noqa: E402
from tests.test_unipc import mixture_velocity  # noqa: E402

STEPS = (5, 10, 20)
PROMPTS = ["a red circle moving left", "a blue square staying still", "a green triangle moving up",
           "a yellow circle moving down", "a red square moving right", "a blue triangle moving left",
           "a green circle staying still", "a yellow square moving up"]
Velocity = Callable[[Tensor, Tensor], Tensor]


class Counted:
    """A velocity function that counts its calls."""

    def __init__(self, fn: Velocity) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def solve(name: str, fn: Velocity, x: Tensor, steps: int, shift: float) -> tuple[Tensor, int]:
    """(final state, velocity calls) of one sampler run."""
    counted = Counted(fn)
    if name == "unipc (Wan)":
        sigmas, times = diffusers_flow_schedule(steps, shift)
        out = unipc(counted, x, sigmas, model_times=times)
    else:
        out = SAMPLERS[name](counted, x, get_schedule(steps, shift), None)
    return out, counted.calls


def rel_rms(a: Tensor, ref: Tensor) -> float:
    return ((a - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()


def psnr(a: Tensor, ref: Tensor) -> float:
    """PSNR of pixels in [-1, 1] (peak-to-peak 2)."""
    mse = (a.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def table(fn: Velocity, x: Tensor, shift: float, ref_steps: int,
          decode: Callable[[Tensor], Tensor] | None) -> list[str]:
    t0 = time.perf_counter()
    ref, _ = solve("heun", fn, x, ref_steps, shift)
    ref_video = decode(ref) if decode else None
    print(f"reference: heun {ref_steps} steps, {time.perf_counter() - t0:.1f} s", flush=True)
    cols = ["sampler", "steps", "calls", "rel. latent RMS error"] + (["video PSNR dB"] if decode
                                                                     else [])
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in (*SAMPLERS, "unipc (Wan)"):
        for steps in STEPS:
            out, calls = solve(name, fn, x, steps, shift)
            row = f"| {name} | {steps} | {calls} | {rel_rms(out, ref):.2e} |"
            if decode is not None:
                row += f" {psnr(decode(out), ref_video):.1f} |"
            rows.append(row)
            print(row, flush=True)
    return rows


def analytic(shift: float, ref_steps: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 4, 4, 4, generator=g, dtype=torch.float64)  # (B, C, T, H, W)
    return table(mixture_velocity, x, shift, ref_steps, None)


def trained(pkg_uri: str, shift: float | None, cfg: float | None,
            ref_steps: int) -> tuple[list[str], float, float]:
    model, _ = RenderModel.load(pkg_uri, device=torch.device("cpu"))
    d = read_meta(pkg_uri).render
    shift = shift or d.shift
    cfg = cfg or d.cfg or 4.0
    emb, mask = model.encode_text(PROMPTS + [""])
    text, text_mask, neg, neg_mask = emb[:-1], mask[:-1], emb[-1:], mask[-1:]
    noise = get_noise(model.vae.latent_shape(d.frames, d.height, d.width),
                      list(range(1000, 1000 + len(PROMPTS))))  # (B, C, T', H', W')

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return cfg_velocity(model.dit, x, t, text, text_mask, neg, neg_mask, cfg)

    with torch.no_grad():
        return table(fn, noise, shift, ref_steps, model.decode), shift, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a trained model package (else the analytic field)")
    ap.add_argument("--shift", type=float, help="timestep shift (default: 1 and 3 / package's)")
    ap.add_argument("--cfg", type=float, help="guidance with --model (default: package's or 4)")
    ap.add_argument("--ref-steps", type=int, default=None,
                    help="Heun steps of the reference (default 2000 analytic, 200 --model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings)")
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lines = []
    if args.model:
        ref_steps = args.ref_steps or 200
        rows, shift, cfg = trained(args.model, args.shift, args.cfg, ref_steps)
        lines += [f"Trained package {args.model}: {len(PROMPTS)} prompts, cfg {cfg}, shift "
                  f"{shift}, reference Heun {ref_steps} steps.", "", *rows, ""]
    else:
        ref_steps = args.ref_steps or 2000
        for shift in [args.shift] if args.shift else [1.0, 3.0]:
            lines += [f"Analytic Gaussian-mixture field, shift {shift}, reference Heun "
                      f"{ref_steps} steps.", "", *analytic(shift, ref_steps), ""]
    lines += [f"{machine()}; {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
