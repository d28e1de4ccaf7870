"""`t2v` command line: thin. Each subcommand = a config class + the function that runs it.

`t2v NAME [--config FILE.yaml] [--flag value ...] [dotted.key=value ...]`: the flags are aliases
for config keys; `jobs/NAME.py` calls the same `main` so `ray job submit` runs identical code.
`t2v NAME --help-config` lists every key (type, default, doc) from the config class itself.
`python -m t2v` is the same command (t2v/__main__.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass

from pydantic import BaseModel

from t2v import storage
from t2v.config import (
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    ExportConfig,
    ImportConfig,
    PackConfig,
    RenderConfig,
    ServeConfig,
    SynthConfig,
    TrainConfig,
)
from t2v.configfile import ConfigError, config_help, load_config


@dataclass(frozen=True)
class Command:
    config: type[BaseModel]
    target: str
    """"module:function" that runs the command, imported only when it runs: most of them pull
    in ray and torch, which `t2v --help` should not wait for."""
    help: str
    flags: dict[str, str]
    """--flag -> dotted config key."""
    positional: tuple[str, ...] = ()
    """Keys given by position (`t2v export --diffusers PKG OUT`), in order."""
    switches: tuple[tuple[str, str], ...] = ()
    """(--flag, "key=value") pairs: a flag that sets a key to one value (`--diffusers`)."""

    def run(self, cfg: BaseModel) -> object:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(cfg)


COMMANDS: dict[str, Command] = {
    "data synth": Command(SynthConfig, "t2v.data.synthetic:run_synth", "synthesise a shapes data set as raw shards",
                          {"out": "out", "num": "num", "frames": "frames", "size": "size",
                           "seed": "seed", "shard-size": "shard_size"}),
    "pack": Command(PackConfig, "t2v.data.pack:run_pack_command", "pack videos + captions into raw shards (Ray Data)",
                    {"src": "src", "out": "out", "shard-size": "shard_size", "fps": "fps",
                     "frames": "frames", "size": "size", "buckets": "buckets",
                     "captions": "captions"}),
    "encode": Command(EncodeConfig, "t2v.data.encode:run_encode_command", "raw shards -> latent shards (Ray Data actors)",
                      {"src": "src", "out": "out", "vae": "vae"}),
    "train": Command(TrainConfig, "t2v.train.trainer:run_train", "train the VAE or the DiT (Ray Train + DeepSpeed)",
                     {"out": "out", "name": "name", "data": "data.shards", "vae": "vae",
                      "steps": "steps", "stage": "stage", "init-from": "init_from",
                     "sequence-parallel": "sequence_parallel", "dry-run": "dry_run"}),
    "render": Command(RenderConfig, "t2v.render.pipeline:run_render_command",
                      "prompt file -> videos, posters, manifest (Ray Data actor pool)",
                      {"model": "model", "prompts": "prompts", "out": "out", "steps": "steps",
                       "cfg": "cfg", "sampler": "sampler", "seed": "seed", "frames": "frames",
                       "height": "height", "width": "width", "num-per-prompt": "num_per_prompt",
                       "crf": "crf", "batch-size": "batch_size", "concurrency": "concurrency",
                       "gpus-per-worker": "gpus_per_worker", "overwrite": "overwrite",
                       "dry-run": "dry_run"}),
    "serve": Command(ServeConfig, "t2v.serve.app:run_serve_command",
                     "the online API and web page (Ray Serve) over a model package",
                     {"model": "model", "out": "out", "port": "port", "host": "host",
                      "replicas": "replicas", "address": "address"}),
    "export": Command(ExportConfig, "t2v.models.wan_export:run_export_command",
                      "a model package -> a diffusers WanPipeline folder (+ LoRA weights)",
                      {"overwrite": "overwrite"}, positional=("package", "out"),
                      switches=(("diffusers", "format=diffusers"),)),
    "eval": Command(EvalConfig, "t2v.eval.report:run_eval_command",
                    "score renders against prompt ground truth; VAE and flow-loss numbers",
                    {"renders": "renders", "prompts": "prompts", "out": "out", "model": "model",
                     "heldout": "heldout"}),
    "import": Command(ImportConfig, "t2v.models.wan_import:run_import_command",
                      "a pretrained checkpoint folder (Wan 2.1 diffusers format) -> package",
                      {"wan": "wan", "out": "out"}),
    "demo": Command(DemoConfig, "t2v.demo:run_demo",
                    "synthetic data -> VAE -> latents -> DiT -> render held-out prompts -> eval",
                    {"out": "out", "ray-address": "ray_address", "quick": "quick",
                     "long": "long", "verbose": "verbose"}),
}


def _parser(name: str, cmd: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"t2v {name}", description=cmd.help)
    p.add_argument("--config", help="YAML config file (local path or s3:// URI)")
    p.set_defaults(switches=[])
    for flag, key in cmd.flags.items():
        field = cmd.config.model_fields.get(key)
        if field is not None and field.annotation is bool:
            # A switch: `--dry-run` alone means true (`dry_run=false` still works as override).
            p.add_argument(f"--{flag}", dest=f"flag:{key}", action="store_const", const="true",
                           help=f"= {key}=true")
        else:
            p.add_argument(f"--{flag}", dest=f"flag:{key}", metavar="VALUE",
                           help=f"= {key}=VALUE")
    for flag, setting in cmd.switches:
        p.add_argument(f"--{flag}", dest="switches", action="append_const", const=setting,
                       help=f"= {setting}")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key (type, default, doc) and exit")
    names = " ".join(k.upper() for k in cmd.positional)
    p.add_argument("overrides", nargs="*", metavar=f"{names + ' ' if names else ''}key=value",
                   help="dotted config overrides" + (f"; {names} by position" if names else ""))
    return p


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: t2v COMMAND [--config FILE.yaml] [--flag VALUE ...] [key=value ...]",
             "       t2v COMMAND --help | --help-config", "", "commands:"]
    lines += [f"  {n:<{width}}  {c.help}" for n, c in COMMANDS.items()]
    return "\n".join(lines)


def _settings(cmd: Command, args: argparse.Namespace) -> list[str]:
    """The command line as overrides: flags, switches, positional values, key=value items."""
    out = [f"{k[5:]}={v}" for k, v in vars(args).items()
           if k.startswith("flag:") and v is not None]
    out += args.switches
    given = [a for a in args.overrides if "=" not in a]
    if len(given) > len(cmd.positional):
        raise ConfigError(f"unexpected argument {given[len(cmd.positional)]!r} (settings are "
                          "key=value)")
    out += [f"{key}={value}" for key, value in zip(cmd.positional, given, strict=False)]
    return out + [a for a in args.overrides if "=" in a]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # no "Found credentials" chatter
    name = " ".join(argv[:2]) if argv[:1] == ["data"] else (argv[0] if argv else "")
    if name not in COMMANDS:
        ok = not argv or argv[0] in ("-h", "--help")
        if not ok:
            print(f"t2v: unknown command {argv[0]!r}", file=sys.stderr)
        print(_usage(), file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 2
    cmd = COMMANDS[name]
    args = _parser(name, cmd).parse_args(argv[len(name.split()):])
    if args.help_config:
        print(config_help(cmd.config, name, cmd.flags))
        return 0
    try:
        cfg = load_config(cmd.config, args.config, _settings(cmd, args))
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
