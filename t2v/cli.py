"""`t2v` command line: thin. Each subcommand = a config class + the function that runs it.

`t2v NAME [--config FILE.yaml] [--flag value ...] [dotted.key=value ...]`: the flags are aliases
for config keys; `jobs/NAME.py` calls the same `main` so `ray job submit` runs identical code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from t2v import storage
from t2v.config import (
    ConfigError,
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    ImportConfig,
    PackConfig,
    RenderConfig,
    SynthConfig,
    TrainConfig,
    load_config,
    save_resolved,
)


@dataclass(frozen=True)
class Command:
    config: type[BaseModel]
    run: Callable[[BaseModel], object]
    help: str
    flags: dict[str, str]
    """--flag -> dotted config key."""


def run_synth(cfg: SynthConfig) -> dict:
    from t2v.data.shards import ShardWriter
    from t2v.data.synthetic import generate_samples

    t0 = time.time()
    save_resolved(cfg, storage.join(cfg.out, "synth_config.yaml"))
    writer = ShardWriter(cfg.out, shard_size=cfg.shard_size,
                         extra_index={"source": "synthetic", "seed": cfg.seed})
    samples = generate_samples(cfg.num, seed=cfg.seed, frames=cfg.frames, size=cfg.size,
                               fps=cfg.fps, exclude=cfg.exclude, only=cfg.only,
                               two_object_prob=cfg.two_object_prob, crf=cfg.crf)
    for i, (key, fields) in enumerate(samples, 1):
        writer.write(key, fields)
        if i % cfg.shard_size == 0 or i == cfg.num:
            rate = i / max(time.time() - t0, 1e-9)
            print(f"[synth] {i}/{cfg.num} clips ({rate:.0f}/s) -> {cfg.out}", flush=True)
    index = writer.close()
    return {"out": cfg.out, "samples": index["total"], "shards": len(index["shards"]),
            "seconds": round(time.time() - t0, 2)}


def run_pack(cfg: PackConfig) -> dict:
    from t2v.data.pack import run_pack as pack
    from t2v.runtime import check_output_uri, ensure_ray

    check_output_uri(cfg.out)
    ensure_ray()
    report = pack(cfg)
    return {k: v for k, v in report.items() if k != "skips"}


def run_encode(cfg: EncodeConfig) -> dict:
    from t2v.data.encode import run_encode_command

    return run_encode_command(cfg)


def run_train(cfg: TrainConfig) -> dict:
    from t2v.train.trainer import run_train as train

    return train(cfg)


def run_render(cfg: RenderConfig) -> dict:
    from t2v.render.pipeline import run_render_command

    return run_render_command(cfg)


def run_eval(cfg: EvalConfig) -> dict:
    from t2v.eval.report import run_eval_command

    return run_eval_command(cfg)


def run_import(cfg: ImportConfig) -> dict:
    from t2v.models.wan_import import run_import_command

    return run_import_command(cfg)


def run_demo(cfg: DemoConfig) -> dict:
    from t2v.demo import run_demo as demo

    return demo(cfg)


COMMANDS: dict[str, Command] = {
    "data synth": Command(SynthConfig, run_synth, "synthesise a shapes data set as raw shards",
                          {"out": "out", "num": "num", "frames": "frames", "size": "size",
                           "seed": "seed", "shard-size": "shard_size"}),
    "pack": Command(PackConfig, run_pack, "pack videos + captions into raw shards (Ray Data)",
                    {"src": "src", "out": "out", "shard-size": "shard_size", "fps": "fps",
                     "frames": "frames", "captions": "captions"}),
    "encode": Command(EncodeConfig, run_encode, "raw shards -> latent shards (Ray Data actors)",
                      {"src": "src", "out": "out", "vae": "vae"}),
    "train": Command(TrainConfig, run_train, "train the VAE or the DiT (Ray Train + DeepSpeed)",
                     {"out": "out", "name": "name", "data": "data.shards", "vae": "vae",
                      "steps": "steps", "stage": "stage", "init-from": "init_from"}),
    "render": Command(RenderConfig, run_render,
                      "prompt file -> videos, posters, manifest (Ray Data actor pool)",
                      {"model": "model", "prompts": "prompts", "out": "out", "steps": "steps",
                       "cfg": "cfg", "sampler": "sampler", "seed": "seed", "frames": "frames",
                       "height": "height", "width": "width", "num-per-prompt": "num_per_prompt",
                       "crf": "crf", "batch-size": "batch_size", "concurrency": "concurrency",
                       "gpus-per-worker": "gpus_per_worker", "overwrite": "overwrite",
                       "dry-run": "dry_run"}),
    "eval": Command(EvalConfig, run_eval,
                    "score renders against prompt ground truth; VAE and flow-loss numbers",
                    {"renders": "renders", "prompts": "prompts", "out": "out", "model": "model",
                     "heldout": "heldout"}),
    "import": Command(ImportConfig, run_import,
                      "a pretrained checkpoint folder (Wan 2.1 diffusers format) -> package",
                      {"wan": "wan", "out": "out"}),
    "demo": Command(DemoConfig, run_demo,
                    "synthetic data -> VAE -> latents -> DiT -> render held-out prompts -> eval",
                    {"out": "out", "ray-address": "ray_address", "quick": "quick",
                     "long": "long"}),
}


def _parser(name: str, cmd: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"t2v {name}", description=cmd.help)
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    for flag, key in cmd.flags.items():
        field = cmd.config.model_fields.get(key)
        if field is not None and field.annotation is bool:
            # A switch: `--dry-run` alone means true (`dry_run=false` still works as override).
            p.add_argument(f"--{flag}", dest=f"flag:{key}", action="store_const", const="true",
                           help=f"= {key}=true")
        else:
            p.add_argument(f"--{flag}", dest=f"flag:{key}", metavar="VALUE",
                           help=f"= {key}=VALUE")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # no "Found credentials" chatter
    name = " ".join(argv[:2]) if argv[:1] == ["data"] else (argv[0] if argv else "")
    if name not in COMMANDS:
        print("usage: t2v {" + ",".join(COMMANDS) + "} [--config FILE] [key=value ...]",
              file=sys.stderr)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cmd = COMMANDS[name]
    args = _parser(name, cmd).parse_args(argv[len(name.split()):])
    overrides = [f"{k[5:]}={v}" for k, v in vars(args).items()
                 if k.startswith("flag:") and v is not None]
    try:
        cfg = load_config(cmd.config, args.config, overrides + args.overrides)
        result = cmd.run(cfg)
    except (ConfigError, storage.StorageError, ValueError) as e:
        if os.environ.get("T2V_DEBUG"):
            raise
        print(f"t2v {name}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
