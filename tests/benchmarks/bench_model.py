"""VideoDiT vs diffusers' WanTransformer3DModel: fp32 forward+backward on CPU, same run.

Both models get the `small` preset geometry and the SAME weights (diffusers' random weights,
converted with t2v.models.wan); equal FLOPs are checked with FlopCounterMode (SDPA counted
through its math backend, whose bmm's the counter sees). The machine's fp32 matmul peak is measured
in the same run, and model FLOP/s is reported as a fraction of it.

    .venv/bin/python tests/benchmarks/bench_model.py [--out runs/bench/model.json] [--profile]

Timings alternate between the two models step by step, so load from other processes on the
machine hits both alike; the load average is recorded with the result. On a shared machine the
minimum step time is the better measure of the code, the median of what a user would see. A
profiled step of each model then splits the time into GEMM, fused attention and the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from t2v.models.dit import VideoDiT, dit_config
from t2v.models.wan import convert_wan_state_dict, wan_config_to_dit


def wan_kwargs(name: str) -> dict:
    """diffusers WanTransformer3DModel arguments with the geometry of one of our presets."""
    c = dit_config(name)
    return dict(patch_size=c.patch, num_attention_heads=c.heads, attention_head_dim=c.head_dim,
                in_channels=c.in_channels, out_channels=c.output_channels, text_dim=c.text_dim,
                freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.depth,
                cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=c.eps)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GEMM FLOP/s of n x n x n over `reps` runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train_flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward")


def time_breakdown(fn) -> dict[str, float]:
    """Self CPU ms of one step by kind: GEMM, fused attention, everything else (top ops)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    out: dict[str, float] = {"GEMM": 0.0, "attention (SDPA)": 0.0}
    other: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        ms = e.self_cpu_time_total / 1e3
        if e.key in GEMM_OPS:
            out["GEMM"] += ms
        elif "scaled_dot_product" in e.key:
            out["attention (SDPA)"] += ms
        else:
            other[e.key] = ms
    out["other"] = sum(other.values())
    for key, ms in sorted(other.items(), key=lambda kv: -kv[1])[:6]:
        out[f"  of which {key}"] = ms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/model.json")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", default="5x16x32", help="T x H x W of the latent")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="print the full op table too")
    args = ap.parse_args()

    from diffusers import WanTransformer3DModel  # reference only; t2v never imports it

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**wan_kwargs(args.preset))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    ours = VideoDiT(wan_config_to_dit(dict(ref.config)))
    ours.load_state_dict(convert_wan_state_dict(ref.state_dict()))
    cfg = ours.config

    thw = tuple(int(s) for s in args.latent.split("x"))
    x = torch.randn(args.batch, cfg.in_channels, *thw)
    t = torch.rand(args.batch)
    text = torch.randn(args.batch, args.text_len, cfg.text_dim)
    tokens = args.batch * math.prod(ours.grid(tuple(x.shape)))

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        ours(x, t, text).square().mean().backward()

    def step_ref() -> None:
        ref.zero_grad(set_to_none=True)
        ref(x, t * 1000, text, return_dict=False)[0].square().mean().backward()

    with torch.no_grad():
        diff = (ours(x, t, text) - ref(x, t * 1000, text, return_dict=False)[0]).abs().max().item()
    flops_ours, flops_ref = train_flops(step_ours), train_flops(step_ref)
    if abs(flops_ours - flops_ref) > 1e-3 * flops_ref:
        raise SystemExit(f"FLOPs differ: VideoDiT {flops_ours:.4g} vs diffusers {flops_ref:.4g}")

    peak = matmul_peak()
    for _ in range(2):  # warm-up
        step_ours()
        step_ref()
    times: dict[str, list[float]] = {"VideoDiT": [], "diffusers Wan": []}
    for _ in range(args.steps):
        for name, fn in (("VideoDiT", step_ours), ("diffusers Wan", step_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    peak_after = matmul_peak()

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {
        name: {"step_s": med[name], "step_min_s": min(times[name]),
               "gflops": flops_ours / med[name] / 1e9,
               "frac_of_peak": flops_ours / med[name] / max(peak, peak_after),
               "frac_of_peak_min": flops_ours / min(times[name]) / max(peak, peak_after)}
        for name in times
    }
    result = {
        "preset": args.preset, "params": ours.num_params(), "threads": args.threads,
        "batch": args.batch, "latent": list(thw), "tokens": tokens, "text_len": args.text_len,
        "train_flops_per_step": flops_ours, "flops_formula_x3": 3 * ours.flops(x.shape, args.text_len),
        "max_abs_output_diff": diff, "matmul_peak_gflops": [peak / 1e9, peak_after / 1e9],
        "speedup_vs_diffusers": med["diffusers Wan"] / med["VideoDiT"],
        "speedup_vs_diffusers_min": min(times["diffusers Wan"]) / min(times["VideoDiT"]),
        "models": rows,
        "load_average": os.getloadavg(), "torch": torch.__version__,
    }

    print(f"\n{args.preset}: {result['params'] / 1e6:.1f}M params, {tokens} tokens "
          f"(B={args.batch}, latent {args.latent}), text {args.text_len}, fp32, "
          f"{args.threads} threads; fwd+bwd {flops_ours / 1e9:.1f} GFLOP/step (equal for both)")
    print(f"fp32 matmul peak: {peak / 1e9:.0f} / {peak_after / 1e9:.0f} GFLOP/s (before/after); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | step (median) | step (min) | GFLOP/s (median) | of peak (median / min) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s'] * 1e3:.0f} ms | {r['step_min_s'] * 1e3:.0f} ms | "
              f"{r['gflops']:.0f} | {100 * r['frac_of_peak']:.0f} % / "
              f"{100 * r['frac_of_peak_min']:.0f} % |")
    print(f"\nVideoDiT speed-up over diffusers: {result['speedup_vs_diffusers']:.2f}x median, "
          f"{result['speedup_vs_diffusers_min']:.2f}x min; max |output difference| {diff:.2e}")

    # Where the time goes (one profiled step each; the profiler adds some overhead).
    breakdown = {"VideoDiT": time_breakdown(step_ours), "diffusers Wan": time_breakdown(step_ref)}
    result["breakdown_ms"] = breakdown
    print("\n| self CPU ms (1 step) | VideoDiT | diffusers Wan |\n|---|---|---|")
    for key in breakdown["VideoDiT"]:
        ref_ms = breakdown["diffusers Wan"].get(key)
        ref_txt = f"{ref_ms:.0f}" if ref_ms is not None else "-"
        print(f"| {key} | {breakdown['VideoDiT'][key]:.0f} | {ref_txt} |")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            step_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
