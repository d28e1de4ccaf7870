"""`t2v demo`, the README's first command: the whole system on one laptop, in one go.

synthesise shapes clips (some colour x shape x motion combinations held out) -> train the VAE
(Ray Train + DeepSpeed) -> encode latents (Ray Data actors) -> train the DiT (ZeRO-2, 2 workers)
-> render the held-out prompt file (Ray Data actors) -> evaluate prompt adherence.

Each stage is the same code as its own command, with the paths filled in, so every stage is
resumable: rerunning `t2v demo` with the same --out skips finished data, resumes training from
its last checkpoint, skips rendered videos and re-scores. Settings live in PROFILES (embedded, no
files needed); `--quick` / `--long` pick another profile; a key you set wins over any profile.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from pydantic import BaseModel

from t2v import storage
from t2v.config import (
    DemoConfig,
    EncodeConfig,
    EvalConfig,
    OptimConfig,
    RenderConfig,
    SynthConfig,
    TrainConfig,
    TrainDataConfig,
)
from t2v.configfile import deep_merge, save_resolved
from t2v.console import quiet
from t2v.data.encode import run_encode_command
from t2v.data.synthetic import (
    MOVING_TEMPLATES,
    SHAPES,
    STILL_TEMPLATES,
    Combo,
    all_combos,
    heldout_combos,
    run_synth,
)
from t2v.eval.report import results_table, run_eval
from t2v.render.pipeline import run_render_command
from t2v.runtime import check_output_uri, disconnect_ray, ensure_ray, ray_connected
from t2v.train.trainer import run_train

M = TypeVar("M", bound=BaseModel)

def default_profile() -> DemoConfig:
    """32x32, 9 frames: <= 10 minutes on a 2-core laptop (BENCHMARKS.md)."""
    return DemoConfig(
        # Objects of radius 25-30 % of the frame side (SynthConfig.radius; 14-20 % before): a
        # 10-px square covered about one 8-px DiT token and was drawn as a blob (held-out shape
        # 47 %); at 14-19 px it is drawn as asked (95 % in sweep_dit.py --radius, 98 % in the
        # demo: BENCHMARKS.md round 11)
        synth=SynthConfig(num=1024, frames=9, size=32, shard_size=128, radius=(0.25, 0.3),
                          travel=(0.3, 0.4)),
        # 24x at 9x32x32; the pooled-colour shortcut (VAEConfig.shortcut) gets colours right
        # early; the edge term keeps corners (reconstructions' shape 52 % -> 70 %,
        # tests/benchmarks/sweep_vae.py in BENCHMARKS.md)
        vae=TrainConfig(
            stage="vae", name="vae", model="debug",
            model_overrides={"latent_channels": 6, "shortcut": True}, edge_weight=1.0,
            steps=550, batch_size=4,
            num_workers=2, cpus_per_worker=0.5, zero_stage=2, precision="fp32",
            optim=OptimConfig(lr=2e-3, warmup_steps=20, schedule="cosine"), log_every=50,
            ckpt_every=275, val_every=275, val_samples=2, ema_decay=0.99,
            data=TrainDataConfig(frames=9, size=32)),
        encode=EncodeConfig(batch_size=16, concurrency=[2, 2]),
        # ZeRO-0: a 1M-parameter model gains nothing from sharding, and DeepSpeed's ZeRO-2
        # bookkeeping cost 13 % of the samples/s (bench_overhead.py: 299 -> 344 on 2 cores).
        # Eager: compiled blocks (train.compile) train 1.24-1.32x faster through Ray Train,
        # but a first run's compiling (~56 s, both workers at once) costs more than that saves
        # in this 3-minute stage (BENCHMARKS.md, training overhead round 13).
        # 32 a worker (global 64): a step's fixed costs (the gradient all-reduce, DeepSpeed's
        # optimizer step, EMA, Ray Data's hand-off: ~25 ms) over twice the samples; through
        # Ray Train 0.83x the bare loop's samples/s against 0.79x at 16 (AVX2 EPYC, training
        # overhead round 16). 1000 steps (64,000 samples, 1800 x 32 before) in the same time;
        # lr 3e-3 x sqrt(2) for the doubled batch (held-out flow loss 0.077x the untrained
        # against 0.085x at 3e-3 and 0.071x for 1800 x 32; accuracy the same)
        dit=TrainConfig(
            stage="dit", name="dit", model="debug", steps=1000, batch_size=32, num_workers=2,
            cpus_per_worker=0.5, zero_stage=0, precision="fp32",
            optim=OptimConfig(lr=4.2e-3, warmup_steps=30, schedule="cosine"), log_every=100,
            ckpt_every=500, val_every=500, val_samples=4, val_steps=20, caption_dropout=0.1,
            ema_decay=0.99),
        render=RenderConfig(steps=25, cfg=4.0, sampler="euler", batch_size=16,
                            concurrency=[2, 2]),
    )


def quick_profile() -> DemoConfig:
    """CI: the whole chain in a few minutes; quality is only checked to be above chance."""
    cfg = default_profile()
    cfg.synth.num, cfg.synth.shard_size = 256, 64
    # Colour 100 %, held-out flow loss 0.21x the untrained model's (BENCHMARKS.md); 40/150
    # steps gave the same colour and 0.13x in 35 % more time.
    cfg.vae.steps = cfg.vae.ckpt_every = cfg.vae.val_every = 30
    cfg.vae.log_every = 15
    # The VAE learns on 5x16x16 windows (data.crop; validation, latent statistics and export
    # see whole clips): a step costs ~a ninth of a whole clip's, and CI's one VAE run shows
    # the windows end to end
    cfg.vae.data.crop = [5, 16]
    # --long's scale-equivariance term, so that CI runs it through Ray Train and DeepSpeed
    cfg.vae.scale_weight = 0.5
    cfg.dit.steps = cfg.dit.ckpt_every = cfg.dit.val_every = 100
    cfg.dit.log_every, cfg.dit.val_samples, cfg.dit.val_steps = 50, 2, 10
    cfg.dit.optim.warmup_steps = 10
    # the batch-16 recipe the default had before round 16: CI's time (quality is not asked here)
    cfg.dit.batch_size, cfg.dit.ema_decay, cfg.dit.optim.lr = 16, 0.995, 3e-3
    cfg.render.steps = 12
    cfg.heldout_combos, cfg.seeds_per_combo, cfg.heldout_clips = 12, 2, 8
    return cfg


def long_profile() -> DemoConfig:
    """64x64, 17 frames (27x compression). The bar is 45 minutes on a 2-core laptop: met on an
    AVX-512 Xeon, not on an AVX2-only EPYC (47-70 by its speed that hour), where the VAE stage
    alone takes 29-42 (BENCHMARKS.md)."""
    cfg = default_profile()
    # 9 shards of 128: the stages hold the last one out, so the DiT trains on 1024 clips (on
    # 896, 4 (sweep) and 9 (demo) of 96 held-out videos came out empty, background only; on
    # 1024, none: tests/benchmarks/sweep_dit.py --frames 17 --size 64, BENCHMARKS.md round 12)
    cfg.synth.num, cfg.synth.frames, cfg.synth.size = 1152, 17, 64
    # The VAE learns on random 9x32x32 windows (data.crop; a seventh of a whole clip's cost, so
    # 6x the steps of whole clips in less time: 27 -> 32.9 dB) and codes whole 17x64x64 clips.
    # The scale-equivariance term keeps its latents learnable: without it, the better the VAE
    # reconstructed, the less motion the DiT learned (38.5 % on those latents); with it 95.8 %
    # at 31.5 dB (tests/benchmarks/sweep_vae.py + sweep_dit.py; BENCHMARKS.md round 14)
    # Weight 0.25 for 3000 steps: 32.6-33.3 dB (0.5 for 2400: 30.7 dB; BENCHMARKS.md, the
    # fifth to ninth --long runs)
    cfg.vae.steps, cfg.vae.ckpt_every, cfg.vae.val_every, cfg.vae.log_every = 3000, 1500, 1500, 100
    cfg.vae.data.frames, cfg.vae.data.size, cfg.vae.data.crop = 17, 64, [9, 32]
    cfg.vae.scale_weight = 0.25
    # DiT patches of 1x4x4 latent pixels: a token covers 16x16 pixels of the 64x64 frame, 4x4
    # tokens a latent frame, the default demo's token grid (8x8 pixels of 32x32) at twice the
    # resolution; 80 tokens a clip instead of 320, a step ~a quarter of the maths of 1x2x2's
    # (one thread: 72-86 against 296-300 ms). Held-out motion / shape: 1x2x2 and 4500 x 16
    # samples 97.9 / 85.4 % (squares drawn as circles), 1x4x4 and 4500 x 16 87.5 / 82.3 %,
    # 1x4x4 and 9000 x 16 99.0 / 99.0 % (BENCHMARKS.md, --long runs 9, 12, 13). Those 144,000
    # samples now as 4500 x 32, 16 a worker: 185 samples/s through Ray Train against 150 at 8
    # (training overhead round 16), with the default's lr for its batch of 64 scaled to 32:
    # 100 / 100 / 96.9 % held out, the DiT stage 886 s, the run 47.1 min (--long run 14)
    cfg.dit.model_overrides = {"patch": [1, 4, 4]}
    cfg.dit.steps, cfg.dit.batch_size, cfg.dit.ckpt_every, cfg.dit.val_every = 4500, 16, 1500, 1500
    cfg.dit.optim.lr, cfg.dit.optim.warmup_steps = 3e-3, 25
    cfg.render.batch_size = 8
    return cfg


PROFILES: dict[str, Callable[[], DemoConfig]] = {
    "default": default_profile, "quick": quick_profile, "long": long_profile}


def overlay(base: M, top: M) -> M:
    """`base` with every field that `top` set explicitly (on the command line or in --config)
    taken from `top`, section by section; a mapping (`model_overrides`) key by key, so that
    `dit.model_overrides.dim=192` keeps the profile's `patch`."""
    updates = {}
    for name in top.model_fields_set:
        value, current = getattr(top, name), getattr(base, name)
        if isinstance(value, BaseModel) and isinstance(current, BaseModel):
            value = overlay(current, value)
        elif isinstance(value, dict) and isinstance(current, dict):
            value = deep_merge(current, value)  # as --config files and KEY=VALUE merge
        updates[name] = value
    return base.model_copy(update=updates)


def apply_profile(cfg: DemoConfig, profile: Callable[[], DemoConfig]) -> DemoConfig:
    """The profile's config with the user's explicit keys on top: a key you set wins."""
    return overlay(profile(), cfg)


def heldout_prompt_rows(combos: list[Combo], seeds: int, split: str | None = None) -> list[dict]:
    """The eval prompt file: `seeds` rows per combination, ground truth in `meta` (with
    `split` "train" for combinations seen in training, which the report scores apart)."""
    rows = []
    for combo in combos:
        for k in range(seeds):
            pool = STILL_TEMPLATES if combo.motion == "still" else MOVING_TEMPLATES
            prompt = pool[k % len(pool)].format(colour=combo.colour, shape=combo.shape,
                                                motion=combo.motion)
            meta = {"colour": combo.colour, "shape": combo.shape, "motion": combo.motion,
                    "count": 1} | ({"split": split} if split else {})
            rows.append({"id": f"{'train-' if split == 'train' else ''}{combo.colour}-"
                               f"{combo.shape}-{combo.motion}-{k}",
                         "prompt": prompt, "seed": 1000 + k, "meta": meta})
    return rows


def training_combos(n: int, held: list[Combo], seed: int = 4321) -> list[Combo]:
    """`n` combinations the training data has, matched to the held-out ones: a systematic sample
    of `held` ordered by shape (so the shapes come in about held's proportions), each paired with
    a training combination of the same shape and motion in another colour, drawn once from
    `seed`. Training-combination scores then compare like with like: a plain draw gave the demo
    4 circles and 2 squares against held-out 6 triangles, 3 squares and 3 circles, and circles
    are the shape every model draws best (BENCHMARKS round 10)."""
    names = {str(c) for c in held}
    seen = [c for c in all_combos() if str(c) not in names]
    rng = np.random.default_rng(seed)
    ordered = sorted(held, key=lambda c: (SHAPES.index(c.shape), str(c)))
    chosen: list[Combo] = []
    for i in range(min(n, len(seen))):
        free = [c for c in seen if c not in chosen]
        pools = [free]
        if ordered:  # same shape and motion, else same shape, else any
            target = ordered[int(i * len(ordered) / n) % len(ordered)]
            same = [c for c in free if c.shape == target.shape]
            pools = [[c for c in same if c.motion == target.motion], same, free]
        pool = next(p for p in pools if p)
        chosen.append(pool[int(rng.integers(len(pool)))])
    return sorted(chosen, key=str)


class Stages:
    """Numbered progress lines with elapsed time, and per-stage wall times for the summary."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0, self.times = total, 0, time.time(), {}
        self._name, self._start = None, self.t0

    def start(self, name: str, what: str) -> None:
        self._close()
        self.n += 1
        self._name, self._start = name, time.time()
        print(f"\n[demo {self.n}/{self.total} +{self._start - self.t0:.0f}s] {what}", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.time() - self._start, 1)

    def done(self) -> dict[str, float]:
        self._close()
        self._name = None
        return self.times | {"total": round(time.time() - self.t0, 1)}


def _synth_once(synth: SynthConfig, label: str) -> None:
    if storage.exists(storage.join(synth.out, "_index.json")):
        print(f"[demo] {label}: {synth.out} exists, kept", flush=True)
        return
    run_synth(synth)


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.quick and cfg.long:
        raise ValueError("demo: --quick and --long exclude each other")
    profile = "quick" if cfg.quick else "long" if cfg.long else "default"
    cfg = apply_profile(cfg, PROFILES[profile])
    check_output_uri(cfg.out)
    out = cfg.out if "://" in cfg.out else os.path.abspath(cfg.out)  # Ray Train needs absolute
    stages = Stages(7)
    held = heldout_combos(cfg.heldout_combos)
    held_names = [str(c) for c in held]
    path = {k: storage.join(out, k) for k in ("data/train", "data/heldout", "latents", "runs",
                                               "prompts/heldout.jsonl", "renders", "eval")}
    s = cfg.synth
    train_synth = s.model_copy(update={"out": path["data/train"],
                                       "exclude": sorted(set(s.exclude) | set(held_names))})
    held_synth = s.model_copy(update={"out": path["data/heldout"], "only": held_names,
                                      "exclude": [], "num": cfg.heldout_clips,
                                      "seed": s.seed + 7919, "shard_size": cfg.heldout_clips})
    vae_pkg = storage.join(path["runs"], cfg.vae.name, "package")
    dit_pkg = storage.join(path["runs"], cfg.dit.name, "package")
    vae = cfg.vae.model_copy(update={"stage": "vae", "out": path["runs"],
                                     "ray_address": cfg.ray_address})
    vae.data = vae.data.model_copy(update={"shards": path["data/train"]})
    encode = cfg.encode.model_copy(update={"src": path["data/train"], "out": path["latents"],
                                           "vae": vae_pkg})
    dit = cfg.dit.model_copy(update={"stage": "dit", "out": path["runs"], "vae": vae_pkg,
                                     "ray_address": cfg.ray_address})
    dit.data = dit.data.model_copy(update={"shards": path["latents"]})
    render = cfg.render.model_copy(update={"model": dit_pkg, "prompts": path[
        "prompts/heldout.jsonl"], "out": path["renders"]})
    evaluate = cfg.eval.model_copy(update={"renders": path["renders"], "prompts": path[
        "prompts/heldout.jsonl"], "out": path["eval"], "model": dit_pkg,
        "heldout": path["data/heldout"], "heldout_clips": cfg.heldout_clips})
    save_resolved(cfg.model_copy(update={"out": out, "synth": train_synth, "vae": vae,
                                         "encode": encode, "dit": dit, "render": render,
                                         "eval": evaluate}),
                  storage.join(out, "config.yaml"))

    log_path = (storage.local_path(storage.join(out, "logs", "demo.log")) if storage.is_local(out)
                else Path(tempfile.gettempdir()) / f"t2v-demo-{os.getpid()}.log")
    if not cfg.verbose:
        print(f"[demo] Ray's, DeepSpeed's and torch's own output: {log_path} (--verbose shows "
              "it here)", flush=True)
    owns_ray = not ray_connected()  # False in-process under tests: their cluster stays up
    with quiet(log_path, cfg.verbose) as console:
        report = _run_stages(cfg, stages, held, rows_path=path["prompts/heldout.jsonl"],
                             train_synth=train_synth, held_synth=held_synth, vae=vae,
                             encode=encode, dit=dit, render=render, evaluate=evaluate)
        stages.start("report", "results")
        times = stages.done()
        console.say(f"\n{results_table(report)}\n\n{what_this_shows(report, held, cfg)}\n\n"
                    f"stage seconds: {json.dumps(times)}\nreport: "
                    f"{storage.join(path['eval'], 'report.json')}\ncontact sheet: "
                    f"{storage.join(path['eval'], 'contact_sheet.png')}")
        if owns_ray:  # Ray forwards its workers' last lines late: into the log, not after this
            disconnect_ray()
    summary = {"out": out, "profile": profile, "heldout": [str(c) for c in held],
               "seconds": times,
               "accuracy": {a: round(v["accuracy"], 4) for a, v in report["attributes"].items()},
               "splits": {k: {a: round(v["accuracy"], 4) for a, v in split.items()}
                          for k, split in report.get("splits", {}).items()},
               "shuffled": {a: round(v["accuracy"], 4) for a, v in
                            report.get("controls", {}).get("shuffled", {}).items()},
               "model": report.get("model", {}), "render": report.get("render", {})}
    storage.write_text(storage.join(out, "demo_summary.json"), json.dumps(summary, indent=1))
    return {k: summary[k] for k in ("out", "profile", "accuracy")} | {
        "seconds": times["total"], "summary": storage.join(out, "demo_summary.json")}


def what_this_shows(report: dict, held: list[Combo], cfg: DemoConfig) -> str:
    """A few lines that say what the table means, for someone who has never seen it."""
    shuffled = report.get("controls", {}).get("shuffled", {})
    followed = [a for a in ("colour", "shape", "motion") if a in report["attributes"]
                and a in shuffled and report["attributes"][a]["wilson95"][0]
                > shuffled[a]["accuracy"]]
    lines = [
        f"What this shows: the DiT never saw these {len(held)} colour x shape x motion "
        f"combinations in training (each colour, shape and motion it did see, with other "
        f"partners): {', '.join(str(c) for c in held)}.",
        f"- held-out: {cfg.seeds_per_combo} videos per combination, judged by a detector that "
        "reads only the pixels; 95% CI is the Wilson interval.",
        f"- train: {cfg.train_combos} combinations it did see, each with a held-out one's shape "
        "and motion, rendered the same way (memorisation; held-out close to train means it "
        "composes).",
        "- shuffled: the same held-out videos judged against other prompts' attributes; an "
        "attribute the model follows falls to chance there. Followed beyond chance: "
        f"{', '.join(followed) or 'none yet'}.",
        "- VAE rec. / clips: the detector on held-out clips after the VAE and on the clips "
        "themselves, the most a render can score.",
    ]
    shape = report["attributes"].get("shape", {}).get("confusion", {})
    if shape:  # where the shape score comes from: what was drawn for each shape asked
        lines.append("- shape drawn, by the shape asked (held-out): " + "; ".join(
            f"{asked} {drawn.get(asked, 0)}/{sum(drawn.values())}"
            + (f" (else {', '.join(f'{k} {v}' for k, v in drawn.items() if k != asked)})"
               if set(drawn) - {asked} else "")
            for asked, drawn in shape.items()) + ".")
    return "\n".join(lines)


def _run_stages(cfg: DemoConfig, stages: Stages, held: list[Combo], rows_path: str,
                train_synth: SynthConfig, held_synth: SynthConfig, vae: TrainConfig,
                encode: EncodeConfig, dit: TrainConfig, render: RenderConfig,
                evaluate: EvalConfig) -> dict:
    """Every stage from synth to eval; returns the eval report."""
    s = cfg.synth
    stages.start("synth", f"synthesising {s.num} training clips ({s.frames}x{s.size}x{s.size}) "
                 f"without {len(held)} held-out combinations, + {cfg.heldout_clips} held-out")
    _synth_once(train_synth, "training data")
    _synth_once(held_synth, "held-out clips")
    rows = (heldout_prompt_rows(held, cfg.seeds_per_combo)
            + heldout_prompt_rows(training_combos(cfg.train_combos, held), cfg.seeds_per_combo,
                                  split="train"))
    storage.write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    # Logical CPUs for a local Ray: at least 4, so that Ray Data's decode tasks get scheduled
    # beside 2 training workers on a 2-core laptop (they mostly wait on each other anyway).
    ensure_ray(cfg.ray_address, num_cpus=cfg.num_cpus or max(4, os.cpu_count() or 1))

    stages.start("vae", f"training the VAE ({vae.model}, {vae.steps} steps, {vae.num_workers} "
                 f"workers, ZeRO-{vae.zero_stage})")
    run_train(vae)
    stages.start("encode", "encoding training clips to latent shards (Ray Data actors)")
    run_encode_command(encode)
    stages.start("dit", f"training the DiT ({dit.model}, {dit.steps} steps, {dit.num_workers} "
                 f"workers, ZeRO-{dit.zero_stage}{', compiled blocks' if dit.compile else ''})")
    run_train(dit)
    stages.start("render", f"rendering {len(rows)} prompts ({len(held)} held-out and "
                 f"{cfg.train_combos} training combinations x {cfg.seeds_per_combo} seeds; "
                 f"{render.steps} {render.sampler} steps, cfg {render.cfg})")
    run_render_command(render)
    stages.start("eval", "detecting colour, shape and motion in every video")
    return run_eval(evaluate)
