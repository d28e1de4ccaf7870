"""What reading the demo's shards costs, per sample ([5/7] item 4, BENCHMARKS.md rounds 6, 16).

    .venv/bin/python tests/benchmarks/bench_read.py [--data DIR]
    .venv/bin/python tests/benchmarks/bench_read.py --video [--data DIR]

`--video`: the raw clips the VAE stage reads instead, as `t2v demo --long` makes them (1152
clips of 17x64x64 in 9 shards of 128; kept in --data between runs): H.264 decoding alone
(`decode_video`, one process) and a pass through Ray Data as the VAE stage reads it
(`video_stream` + `iter_batches`, the driver consuming), with Ray's other processes' CPU.

The demo-sized latents of bench_overhead.py (1024 clips in 8 shards; kept in --data between
runs), the 7 training shards read three ways: our tar reader alone (`read_tar_samples`), a whole
read task in one process (`read_shard` with `decode_latent_rows`: tar, .npy, stacked blocks),
and a pass through Ray Data as training reads it (`latent_stream` + `iter_torch_batches`, the
driver consuming), with the CPU time of every other process on the machine (Ray's) per pass.
CPU seconds (`time.process_time`, psutil), best of three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import DRIVER, cpu_seconds  # noqa: E402


def others_cpu() -> float:
    """CPU seconds so far of every process but this one."""
    return sum(t for kind, t in cpu_seconds().values() if kind != DRIVER)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--video", action="store_true", help="the VAE stage's raw clips")
    args = p.parse_args()
    if args.video:
        return main_video(args.data or "runs/bench/read-video")
    args.data = args.data or "runs/bench/read-latents"
    import ray
    from bench_overhead import make_latents

    from t2v.data.collate import LatentCollate
    from t2v.data.latents import MEMBERS, decode_latent_rows, latent_stream
    from t2v.data.shards import iter_tar_samples, shard_uris
    from t2v.data.tarsource import read_shard

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        if not Path(args.data, "latents", "_index.json").exists():
            Path(args.data).mkdir(parents=True, exist_ok=True)
            make_latents(args.data)
        uris = shard_uris(f"{args.data}/latents")[:-1]
        n = sum(1 for _ in iter_tar_samples(uris[0])) * len(uris)

        row = {"samples": n,
               "tar_ms": 1e3 * best_cpu(lambda: [s for u in uris for s in iter_tar_samples(u)])
               / n,
               "read_task_ms": 1e3 * best_cpu(lambda: [b for u in uris for b in read_shard(
                   u, u, None, MEMBERS, None, None, decode_latent_rows)]) / n}
        passes = []
        for _ in range(3):
            o0, c0 = others_cpu(), time.process_time()
            for _b in latent_stream(uris, shuffle_seed=0).iter_torch_batches(
                    batch_size=16, collate_fn=LatentCollate(), prefetch_batches=4):
                pass
            passes.append((others_cpu() - o0, time.process_time() - c0))
        row["ray_others_cpu_s_per_pass"] = min(p[0] for p in passes[1:])  # the first starts workers
        row["consumer_cpu_s_per_pass"] = min(p[1] for p in passes[1:])
        print(json.dumps(row))
    finally:
        ray.shutdown()


def best_cpu(fn, rounds: int = 3) -> float:  # noqa: ANN001
    """The least CPU seconds of this process that `fn()` took over `rounds` calls."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main_video(data: str) -> None:
    import ray

    from t2v.config import ReaderConfig, SynthConfig
    from t2v.data.shards import iter_tar_samples, shard_uris
    from t2v.data.streaming import video_stream
    from t2v.data.synthetic import run_synth
    from t2v.data.video import decode_video

    frames, size = 17, 64
    if not Path(data, "_index.json").exists():
        run_synth(SynthConfig(out=data, num=1152, frames=frames, size=size, shard_size=128,
                              seed=0))
    uris = shard_uris(data)
    clips = [m["mp4"] for k, m in iter_tar_samples(uris[0])]
    n = len(clips) * len(uris)
    row = {"clips": n, "decode_ms": 1e3 * best_cpu(lambda: [
        decode_video(c, num_frames=frames, size=size) for c in clips]) / len(clips)}
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        passes = []
        for _ in range(3):
            stream = video_stream(ReaderConfig(shards=data, frames=frames, size=size,
                                               shuffle_seed=0), uris=uris)
            o0, c0, w0 = others_cpu(), time.process_time(), time.perf_counter()
            got = sum(len(b.keys) for b in stream.iter_batches(batch_size=8, prefetch_batches=4))
            passes.append((others_cpu() - o0, time.process_time() - c0,
                           time.perf_counter() - w0))
            assert got == n, (got, n)
        best = min(passes[1:])  # the first starts Ray's workers
        row.update(ray_others_cpu_ms_per_clip=1e3 * best[0] / n,
                   consumer_cpu_ms_per_clip=1e3 * best[1] / n, pass_wall_s=best[2])
        print(json.dumps(row))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
