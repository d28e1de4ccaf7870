"""Online API benchmark ([6/7] item 6): latency and videos/s of `t2v serve` for 1, 4 and 16
concurrent HTTP clients, against calling the sampler directly.

    .venv/bin/python tests/benchmarks/bench_serve.py [--preset small] [--videos 32] [--steps 20] \
        [--clients 1,4,16] [--poll 0.5]

A random-weight DiT package of `--preset` (9x32x32 videos; the step cost is the model's,
whatever its weights) is served by `t2v serve`'s own function on a local Ray instance: one renderer replica
with 1 CPU (Ray gives it one torch thread), `max_batch_size` 4. Each client thread loops: POST a
video (distinct seeds, so nothing is served from the store), poll its status every `--poll`
seconds until done; a request's latency is POST to "done" as the client sees it. Videos/s is all videos over
the wall time of the level. The direct path is what a user would write without Serve: the same
`Renderer` (load the package once; sample, encode and write each video and its manifest part)
called in this process on one torch thread, in batches of 1 and of 4 (the most the server may
batch). Target: at 16 clients >= 0.9x the direct batch-4 throughput. Prints a markdown table;
--out keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
import torch  # noqa: E402
from bench_render import build_package  # noqa: E402

from t2v.config import RenderConfig, ServeConfig  # noqa: E402
from t2v.models.package import package_hash, read_meta  # noqa: E402
from t2v.render import manifest as mf  # noqa: E402
from t2v.render.pipeline import Renderer, resolve_settings  # noqa: E402
from t2v.render.rows import RenderJob, Sample  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402

BATCH = 4
SHAPE = {"frames": 9, "height": 32, "width": 32}


def prompt(i: int) -> str:
    colours, shapes, motions = ("red", "green", "blue"), ("circle", "square"), ("left", "up")
    return f"a {colours[i % 3]} {shapes[i // 3 % 2]} moving {motions[i // 6 % 2]}"


def direct(pkg: str, out: str, videos: int, steps: int, batch: int) -> float:
    """Videos/s of render's Renderer called in this process (model load excluded)."""
    torch.set_num_threads(1)
    cfg = resolve_settings(RenderConfig(model=pkg, out=out, prompts="bench", steps=steps),
                           read_meta(pkg))  # the package's defaults, as `t2v serve` takes them
    job = RenderJob(model=pkg, package_hash=package_hash(pkg), sampler=cfg.sampler,
                    shift=cfg.shift, fps=cfg.fps, crf=cfg.crf, run=mf.new_run_id(), source="bench")
    renderer = Renderer(cfg, job)
    samples = [Sample(id=f"d{batch}-{i}", prompt=prompt(i), seed=10_000 + i, steps=steps,
                      cfg=4.0, **SHAPE) for i in range(videos)]
    renderer.render_samples(0, samples[:batch])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    rows = [row for index, start in enumerate(range(0, videos, batch), start=1)
            for row in renderer.render_samples(index, samples[start:start + batch])]
    seconds = time.perf_counter() - t0
    bad = [row.error for row in rows if row.status != "ok"]
    if bad:
        raise SystemExit(f"direct path: {len(bad)} videos failed: {bad[0]}")
    return videos / seconds


def clients(url: str, level: int, videos: int, steps: int, seed0: int, poll: float) -> dict:
    """`level` client threads share `videos` requests: latency per request, videos/s, and the
    sizes of the sampler calls the server made for them ({size: calls})."""
    todo = list(range(videos))
    lock, latencies, failed = threading.Lock(), [], []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t0 = time.perf_counter()
            r = requests.post(f"{url}/v1/videos", timeout=60, json={
                "prompt": prompt(i), "seed": seed0 + i, "steps": steps, "cfg": 4.0, **SHAPE})
            if r.status_code not in (200, 202):
                failed.append(r.status_code)
                continue
            vid = r.json()["id"]
            while True:
                status = requests.get(f"{url}/v1/videos/{vid}", timeout=60).json()["status"]
                if status in ("done", "failed"):
                    break
                time.sleep(poll)
            with lock:
                (latencies if status == "done" else failed).append(time.perf_counter() - t0)

    before = requests.get(f"{url}/v1/stats", timeout=60).json()["batch_sizes"]
    threads = [threading.Thread(target=client) for _ in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = requests.get(f"{url}/v1/stats", timeout=60).json()["batch_sizes"]
    sizes = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"clients": level, "videos": len(latencies), "failed": len(failed),
            "videos_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": q[18], "batch_sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small", help="DiT preset of the served package")
    ap.add_argument("--videos", type=int, default=32, help="videos per level and path")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per video")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between status polls")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--out", default="runs/bench/serve.json")
    args = ap.parse_args()
    import ray
    from ray import serve

    from t2v.serve.app import run_serve_command

    with tempfile.TemporaryDirectory() as tmp:
        pkg = build_package(tmp, args.preset)
        rows = [{"path": f"direct, batch {b}",
                 "videos_per_s": direct(pkg, f"{tmp}/direct{b}", args.videos, args.steps, b)}
                for b in (1, BATCH)]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = 18000 + os.getpid() % 1000
            run_serve_command(ServeConfig(model=pkg, out=f"{tmp}/serve", port=port,
                                          max_batch_size=BATCH, max_queue=4 * args.videos,
                                          render=RenderConfig(steps=args.steps), blocking=False))
            url = f"http://127.0.0.1:{port}"
            while requests.get(f"{url}/healthz", timeout=60).status_code != 200:
                time.sleep(0.5)
            clients(url, 1, 2, args.steps, seed0=1, poll=args.poll)  # warm-up: first calls
            for n, level in enumerate(int(c) for c in args.clients.split(",")):
                r = clients(url, level, args.videos, args.steps, seed0=1000 * (n + 1),
                            poll=args.poll)
                rows.append({"path": f"t2v serve, {level} client(s)", **r})
        finally:
            serve.shutdown()
            ray.shutdown()
    best = rows[1]["videos_per_s"]
    lines = [f"`bench_serve.py --preset {args.preset} --videos {args.videos} --steps "
             f"{args.steps} --poll {args.poll}` "
             f"({describe()})",
             "", "| path | videos/s | vs direct batch 4 | p50 latency | p95 latency | batch sizes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lat = (f"{r['p50_s']:.2f} s | {r['p95_s']:.2f} s | {r['batch_sizes']}"
               if "p50_s" in r else "- | - | -")
        lines.append(f"| {r['path']} | {r['videos_per_s']:.2f} | {r['videos_per_s'] / best:.2f}x "
                     f"| {lat} |")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
