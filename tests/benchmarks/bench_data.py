"""Data-path benchmark: the Ray Data reader vs a plain `webdataset` loop over the same shards.

    make bench            # or: .venv/bin/python tests/benchmarks/bench_data.py [--num 384]

Both paths deliver the same thing: float32 (B, T, 3, H, W) batches in [-1, 1] plus captions,
decoded with the same `decode_video`. Local shards and shards on an S3 endpoint (moto, server
mode, 127.0.0.1) are measured. Target (issue [1/7]): Ray path >= 0.8x the plain loop on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t2v import storage  # noqa: E402
from t2v.config import ReaderConfig, SynthConfig  # noqa: E402
from t2v.data.shards import shard_uris  # noqa: E402
from t2v.data.synthetic import run_synth  # noqa: E402
from t2v.data.tensors import to_model_range  # noqa: E402
from t2v.data.video import decode_video  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402


def plain_loop(uris: list[str], frames: int, batch_size: int) -> int:
    """The baseline a user would write: webdataset in one process, same decode and batching."""
    import webdataset as wds

    def s3_open(url: str, mode: str = "rb", bufsize: int = 8192):
        bucket, key = storage.split_s3(url)
        return storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"]

    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = s3_open
    n, pending = 0, []
    for sample in wds.WebDataset(uris, shardshuffle=False):
        clip = decode_video(sample["mp4"], num_frames=frames)
        if clip.shape[0] < frames:
            continue
        pending.append((clip, sample["txt"].decode()))
        if len(pending) == batch_size:
            video = to_model_range(np.stack([c for c, _ in pending]))  # (B, 3, T, H, W)
            n += video.shape[0]
            pending = []
    return n + len(pending)


def ray_loop(root: str, frames: int, batch_size: int) -> int:
    from t2v.data.streaming import video_stream

    stream = video_stream(ReaderConfig(shards=root, frames=frames))
    return sum(b.video.shape[0] for b in stream.iter_batches(batch_size))


def timed(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=384)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="runs/bench/data.json")
    args = p.parse_args()


    import ray

    from tests.s3_fixtures import start_moto_server

    server, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.s3_client().create_bucket(Bucket="bench")
    results: dict = {"machine": describe(), "args": vars(args), "rows": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            roots = {"local": tmp, "s3": "s3://bench/shapes"}
            for root in roots.values():
                run_synth(SynthConfig(out=root, num=args.num, frames=args.frames,
                                      size=args.size, shard_size=32, seed=0))
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray_loop(tmp, args.frames, args.batch_size)  # warm up worker processes
            for where, root in roots.items():
                uris = shard_uris(root)
                for _ in range(args.repeats):
                    for name, fn, arg in (("webdataset loop", plain_loop, uris),
                                          ("Ray Data reader", ray_loop, root)):
                        n, s = timed(fn, arg, args.frames, args.batch_size)
                        assert n == args.num, (name, where, n)
                        results["rows"].append({"source": where, "path": name,
                                                "samples_per_s": n / s, "seconds": s})
                        print(f"{where:5s} {name:16s} {n / s:7.1f} samples/s ({s:.2f} s)",
                              flush=True)
            ray.shutdown()
    finally:
        server.stop()
    summary = []
    for where in ("local", "s3"):
        best = {}
        for row in results["rows"]:
            if row["source"] == where:
                best[row["path"]] = max(best.get(row["path"], 0.0), row["samples_per_s"])
        ratio = best["Ray Data reader"] / best["webdataset loop"]
        summary.append({"source": where, **best, "ratio": ratio})
    results["summary"] = summary
    print("\n| source | webdataset loop (samples/s) | Ray Data reader (samples/s) | ratio |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['source']} | {s['webdataset loop']:.1f} | {s['Ray Data reader']:.1f} | "
              f"{s['ratio']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
