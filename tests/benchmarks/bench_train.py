"""Training throughput: the `small` DiT on 2 CPU workers, ZeRO 0/2/3, shards local and on S3.

    .venv/bin/python tests/benchmarks/bench_train.py [--steps 12] [--out runs/bench/train.json]

Measures steps/s and samples/s (after the first logged interval, which holds start-up), the
peak RSS per worker, and the data-wait fraction (time a worker waits for its next batch / wall
time). Target (issue [3/7]): data wait <= 2 % of step time. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t2v import storage  # noqa: E402
from t2v.config import EncodeConfig, SynthConfig, TrainConfig  # noqa: E402
from t2v.data.synthetic import run_synth  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402


def make_latents(tmp: str) -> str:
    import torch

    from t2v.data.encode import run_encode
    from t2v.models.package import save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, vae_config

    raw, vae_uri, out = f"{tmp}/raw", f"{tmp}/vae", f"{tmp}/latents"
    run_synth(SynthConfig(out=raw, num=96, frames=17, size=64, shard_size=16, seed=0))
    torch.manual_seed(0)
    save_package(vae_uri, vae=CausalVideoVAE(vae_config("debug")).eval(),
                 text=TextEncoderConfig(max_length=16))
    run_encode(EncodeConfig(src=raw, out=out, vae=vae_uri, batch_size=8))
    return out, vae_uri


def run(out: str, shards: str, vae: str, stage: int, steps: int, name: str) -> dict:
    from t2v.train.trainer import run_train

    cfg = TrainConfig.model_validate(dict(
        stage="dit", name=name, out=out, model="small", vae=vae, steps=steps, batch_size=4,
        num_workers=2, cpus_per_worker=1.0, zero_stage=stage, log_every=4, ckpt_every=steps,
        val_every=steps, val_samples=0, data={"shards": shards}))
    run_train(cfg)
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(out, name, "metrics.jsonl")).splitlines()]
    logged = [r for r in rows if "samples_per_s" in r][1:]  # drop the start-up interval
    mean = lambda k: sum(r[k] for r in logged) / len(logged)  # noqa: E731
    return {"zero": stage, "samples_per_s": mean("samples_per_s"),
            "steps_per_s": mean("samples_per_s") / 8, "data_wait": mean("data_wait_frac"),
            "mfu": mean("mfu"), "peak_rss_mb": max(r["worker_peak_rss_mb"] for r in logged)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--out", default="runs/bench/train.json")
    args = p.parse_args()

    import ray

    from tests.s3_fixtures import start_moto_server

    server, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.s3_client().create_bucket(Bucket="bench")
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local, vae = make_latents(tmp)
            s3 = "s3://bench/latents"
            for uri in storage.list_prefix(local):
                storage.upload_file(uri, storage.join(s3, uri[len(local) + 1:]))
            for stage in [int(s) for s in args.stages.split(",")]:
                for where, shards in (("local", local), ("s3", s3)):
                    if where == "s3" and stage != 2:
                        continue
                    r = run(f"{tmp}/runs", shards, vae, stage, args.steps, f"z{stage}{where}")
                    rows.append({"source": where, **r})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        server.stop()
    print(f"\nmachine: {describe()}; "
          "model: small DiT, 2 workers x batch 4, latents 4x5x16x16, MiniLM text (16 tokens)")
    print("| ZeRO | shards | samples/s | steps/s | data wait | MFU | peak RSS/worker |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zero']} | {r['source']} | {r['samples_per_s']:.1f} | "
              f"{r['steps_per_s']:.2f} | {100 * r['data_wait']:.1f} % | {100 * r['mfu']:.1f} % | "
              f"{r['peak_rss_mb']:.0f} MiB |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
