"""`t2v render`: a prompt file -> videos, posters and a manifest, on a Ray Data actor pool.

The driver does everything cheap and decisive before a GPU is touched: it reads the package's
model.json (missing model: one line), parses and validates the whole prompt file (bad rows become
error rows), writes and deletes `{out}/.preflight` (missing bucket, no permission: one line), and
reads the manifest to skip ids already rendered. It then groups the remaining videos into batches
of equal (frames, height, width, steps, guided) -- steps and shape must match inside one sampler
call, cfg may differ per row -- and sends one batch per Ray Data row to `Renderer` actors
(`map_batches` with a callable class, `concurrency=(min, max)`). Each actor loads the package
once, samples with per-row seeds (a video never depends on its batch mates), encodes mp4 and
poster, writes them atomically and then its manifest part. Ray Data restarts an actor lost with
its node and retries its batch; the rewrite is idempotent.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import ray
import torch

from t2v import storage
from t2v.config import RenderConfig
from t2v.data.video import encode_mp4, to_png
from t2v.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS, Progress
from t2v.models.dit import VideoDiT
from t2v.models.package import PackageError, PackageMeta, RenderDefaults, package_hash, read_meta
from t2v.models.text import load_tokenizer, token_counts
from t2v.render import manifest as mf
from t2v.render.manifest import ManifestRow
from t2v.render.model import RenderModel, render_batch, vae_tiling
from t2v.render.prompts import ParsedPrompts, PromptRules, parse_prompts, prompt_format
from t2v.render.rows import SAMPLES, BatchKey, RenderJob, Sample
from t2v.runtime import check_output_uri, ensure_ray

log = logging.getLogger("t2v.render")

FALLBACK_STEPS, FALLBACK_CFG, FALLBACK_SAMPLER = 30, 5.0, DEFAULT_SAMPLER
"""Sampling settings when neither the job nor the package's render defaults give them. There is
no fallback geometry: a video's size comes from the row, the job or the package."""
MEASURE_MAX_PARAMS = 60_000_000
"""Dry-run ETA: DiTs up to this size are timed on the driver's CPU; larger ones are estimated
from FLOPs (a CPU driver cannot time a 1B model at 480p in reasonable time)."""
MEASURE_MAX_TOKENS = 4096
"""A dry run times one DiT step per shape up to this many tokens per video; larger shapes (a
row may ask for 1025 x 4096 x 4096: ~70M tokens) are estimated from their FLOPs at the rate
measured on the largest timed shape, so the dry run itself needs little memory and time."""
ASSUMED_FLOPS = {"gpu": 0.4 * 989e12, "cpu": 0.5 * 2.6e11}
"""Sustained FLOP/s for the FLOPs estimate: 40% of H100 bf16 dense peak, half of this project's
2-core reference CPU (see TrainConfig.peak_flops)."""


class InjectedFault(RuntimeError):
    """Raised by the `fail_after` test hook."""


# ----------------------------------------------------------------------------- sampling


class Renderer:
    """Ray Data actor: a row {"index", "samples" (`SAMPLES` JSON)} -> written videos, a manifest
    part, and one output row {"id", "status"} per video."""

    def __init__(self, cfg: RenderConfig, job: RenderJob) -> None:
        self.cfg, self.job = cfg, job
        self.model, digest = RenderModel.load(cfg.model, truncate=cfg.truncate,
                                              offload_text=cfg.offload_text,
                                              vae_chunk=cfg.vae_chunk, vae_tile=cfg.vae_tile)
        if digest != job.package_hash:  # every row must say what made its video
            raise PackageError(f"{cfg.model}: the package changed while the job ran (hash "
                               f"{digest[:12]}, planned {job.package_hash[:12]})")
        self.written = 0
        self.progress: Progress | None = None
        """Called with (step, steps) as a batch samples (set by the online API per batch)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [row for index, samples in zip(batch["index"], batch["samples"], strict=True)
                for row in self.render_samples(int(index), SAMPLES.validate_json(samples))]
        return {"id": np.array([r.id for r in rows], dtype=object),
                "status": np.array([r.status for r in rows], dtype=object)}

    def _fault(self) -> None:
        limit = self.cfg.fail_after
        if limit is not None and self.written >= limit:
            raise InjectedFault(f"fail_after={limit}: injected failure after {self.written} "
                                "videos written by this actor")

    def render_samples(self, index: int, samples: list[Sample]) -> list[ManifestRow]:
        """One batch: sample, write each video and poster, then the manifest part `b{index}`
        (also the online API's unit of work, t2v/serve/app.py)."""
        self._fault()
        t0 = time.time()
        try:
            results = [(s, v, None) for s, v in zip(samples, self._sample(samples), strict=True)]
        except Exception as e:  # noqa: BLE001 - a bad batch is isolated row by row below
            if len(samples) == 1:
                results = [(samples[0], None, _line(e))]
            else:
                results = [self._one(s) for s in samples]
        per_video = (time.time() - t0) / len(samples)
        rows = [self._write(s, video, err, per_video) for s, video, err in results]
        self._fault()  # after the videos, before their rows: the worst moment to die
        mf.write_part(self.cfg.out, self.job.run, f"b{index:06d}", rows)
        return rows

    def _sample(self, samples: list[Sample]) -> list[np.ndarray]:
        z, videos = render_batch(self.model, samples, self.cfg.sampler, self.cfg.shift,
                                 progress=self.progress)
        bad = (~torch.isfinite(z).flatten(1).all(dim=1)).tolist()
        if any(bad):
            raise ValueError("non-finite latents")
        return videos

    def _one(self, sample: Sample) -> tuple[Sample, np.ndarray | None, str | None]:
        try:
            return sample, self._sample([sample])[0], None
        except Exception as e:  # noqa: BLE001 - recorded in the row; the job goes on
            return sample, None, _line(e)

    def _write(self, sample: Sample, video: np.ndarray | None, error: str | None,
               seconds: float) -> ManifestRow:
        if error is None:
            t0 = time.time()
            try:
                mp4 = encode_mp4(video, fps=self.cfg.fps, crf=self.cfg.crf)
                png = to_png(video[video.shape[0] // 2])  # the middle frame
                vuri = mf.video_uri(self.cfg.out, sample.id)
                puri = mf.poster_uri(self.cfg.out, sample.id)
            except ValueError as e:  # this video cannot be encoded: its row says so
                error = _line(e)
            else:
                # A storage error (after the client's retries) is the job's, not the video's:
                # it ends the job with one line; a rerun renders what is missing.
                storage.write_bytes(vuri, mp4)  # atomic: all of it or nothing at the final path
                storage.write_bytes(puri, png)
                self.written += 1
                return mf.make_row(self.job, sample, status="ok", video=vuri, poster=puri,
                                   seconds=seconds + time.time() - t0)
        return mf.make_row(self.job, sample, status="error", error=error, seconds=seconds)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- planning


@dataclass
class RenderPlan:
    cfg: RenderConfig
    meta: PackageMeta
    job: RenderJob
    """Settings every manifest row records (model, package_hash, sampler, run, ...)."""
    parsed: ParsedPrompts
    todo: list[Sample]
    """Samples to render in this run."""
    done: int
    """Samples skipped: their video and an ok row exist."""
    changed: int
    """Of those, samples whose ok row was made with other settings (kept; --overwrite redoes)."""


def resolve_settings(cfg: RenderConfig, meta: PackageMeta) -> RenderConfig:
    """The job's config with every default a video needs filled in: each flag, else the
    package's render defaults (RenderDefaults), else FALLBACK_* for the sampling settings.

    A package that records no geometry (written before t2v recorded it) needs the size flags.
    """
    if meta.dit is None or meta.vae is None:
        raise PackageError(f"{cfg.model}: rendering needs a DiT and a VAE in the package "
                           f"(dit: {meta.dit is not None}, vae: {meta.vae is not None})")
    vae_tiling(cfg.vae_tile, meta.vae.spatial_down)
    d = meta.render
    if d is None:
        missing = [f"--{n}" for n in ("frames", "height", "width") if getattr(cfg, n) is None]
        if missing:
            raise PackageError(f"{cfg.model}: the package records no render geometry (made "
                               f"before t2v recorded it): give {', '.join(missing)} (the clip "
                               "size it was trained at)")
        d = RenderDefaults(frames=cfg.frames, height=cfg.height, width=cfg.width, fps=8.0)
    sampler = cfg.sampler or d.sampler or FALLBACK_SAMPLER
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} unknown; known: {', '.join(SAMPLERS)}")
    return cfg.model_copy(update={
        "frames": cfg.frames or d.frames, "height": cfg.height or d.height,
        "width": cfg.width or d.width, "fps": cfg.fps or d.fps, "shift": cfg.shift or d.shift,
        "steps": cfg.steps or d.steps or FALLBACK_STEPS, "sampler": sampler,
        "cfg": next(v for v in (cfg.cfg, d.cfg, FALLBACK_CFG) if v is not None)})


def prompt_rules(cfg: RenderConfig, meta: PackageMeta) -> PromptRules:
    """Defaults and limits for prompt rows, from a `resolve_settings` config and the package."""
    rules = PromptRules(
        base_seed=cfg.seed, steps=cfg.steps, cfg=cfg.cfg, negative_prompt=cfg.negative_prompt,
        frames=cfg.frames, height=cfg.height, width=cfg.width,
        temporal_down=meta.vae.temporal_down, temporal_patch=meta.dit.patch[0],
        spatial_multiple=meta.vae.spatial_down * math.lcm(*meta.dit.patch[1:]),
        max_tokens=None if cfg.truncate else meta.text.max_length,
        num_per_prompt=cfg.num_per_prompt)
    probe = parse_prompts(b'{"prompt": "x"}', ".jsonl", rules)  # the defaults must be valid
    if probe.errors:
        raise ValueError(f"render defaults: {probe.errors[0].error} (set --frames/--height/"
                         "--width to suit this model)")
    return rules


def preflight(out: str) -> None:
    """Prove the output location exists and takes writes, before any rendering."""
    uri = storage.join(out, ".preflight")
    storage.write_bytes(uri, b"t2v render preflight\n")
    storage.delete(uri)


SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "cfg", "frames", "height", "width",
            "sampler", "shift", "package_hash")
"""What a video depends on: an ok row that differs in any of these was made otherwise."""


def plan_render(cfg: RenderConfig) -> RenderPlan:
    """Every whole-job check, the parsed prompt file and what is left to do; writes nothing but
    the preflight object, and removes temp files a killed render left (not in a dry run)."""
    for name in ("model", "prompts", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"render needs {name}=URI (--{name})")
    meta = read_meta(cfg.model)
    cfg = resolve_settings(cfg, meta)
    rules = prompt_rules(cfg, meta)
    fmt = prompt_format(cfg.prompts)
    data = storage.read_bytes(cfg.prompts)
    if not cfg.dry_run:
        preflight(cfg.out)
        if stale := storage.remove_stale_temps(cfg.out):
            print(f"[render] removed {stale} temp files a killed render left in {cfg.out}",
                  flush=True)
    counter = None
    if not cfg.truncate:
        tokenizer = load_tokenizer(meta.text)
        counter = partial(token_counts, tokenizer, meta.text)
    parsed = parse_prompts(data, fmt, rules, source=cfg.prompts, count_tokens=counter)
    job = RenderJob(model=cfg.model, package_hash=package_hash(cfg.model), sampler=cfg.sampler,
                    shift=cfg.shift, fps=cfg.fps, crf=cfg.crf, run=mf.new_run_id(),
                    source=cfg.prompts)
    samples = [s for row in parsed.rows for s in row.samples(cfg.num_per_prompt)]
    ok, _ = mf.latest_rows(mf.read_manifest(cfg.out))  # raises on a missing bucket
    videos = set(storage.list_prefix(storage.join(cfg.out, mf.VIDEOS_DIR), suffix=".mp4"))
    todo, done, changed = [], 0, 0
    for s in samples:
        row = ok.get(s.id)
        if cfg.overwrite or row is None or mf.video_uri(cfg.out, s.id) not in videos:
            todo.append(s)
            continue
        done += 1
        expected = s.model_dump() | job.model_dump()
        changed += any(row.get(k) != expected.get(k) for k in SETTINGS)
    return RenderPlan(cfg, meta, job, parsed, todo, done, changed)


def make_batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Group by `Sample.batch_key` (in first-appearance order, rows in line order), then
    chunk."""
    groups: dict[BatchKey, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.batch_key, []).append(s)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def estimate_seconds(plan: RenderPlan) -> tuple[float, str]:
    """Wall seconds to render `plan.todo` on the max actors (DiT steps only), and how."""
    cfg, meta, text_len = plan.cfg, plan.meta, plan.meta.text.max_length
    with torch.device("meta"):
        shapes_only = VideoDiT(meta.dit)  # no memory: parameter count and FLOPs
    measure = cfg.gpus_per_worker == 0 and shapes_only.num_params() <= MEASURE_MAX_PARAMS
    rate = ASSUMED_FLOPS["gpu" if cfg.gpus_per_worker else "cpu"]
    dit = VideoDiT(meta.dit).eval() if measure and plan.todo else None  # random weights: timing
    step: dict[tuple, float] = {}
    total = 0.0
    shapes, timed = [], []
    for batch in make_batches(plan.todo, cfg.batch_size):
        s = batch[0]
        x_shape = (len(batch) * (2 if s.batch_key.guided else 1), meta.dit.in_channels,
                   1 + (s.frames - 1) // meta.vae.temporal_down,
                   s.height // meta.vae.spatial_down, s.width // meta.vae.spatial_down)
        shapes.append((x_shape, s.steps * (2 if cfg.sampler == "heun" else 1)))
    if dit is not None:  # time what is small; the rest at the rate of the largest timed shape
        small = sorted({x for x, _ in shapes if math.prod(shapes_only.grid((1, *x[1:])))
                        <= MEASURE_MAX_TOKENS}, key=math.prod)
        reference = small[-1] if small else (1, meta.dit.in_channels, 1, 8, 8)
        timed = small or [reference]
        for x in timed:
            step[x] = _time_step(dit, x, text_len)
        rate = shapes_only.flops(reference, text_len) / step[reference]
    for x_shape, n_steps in shapes:
        if x_shape not in step:
            step[x_shape] = shapes_only.flops(x_shape, text_len) / rate
        total += step[x_shape] * n_steps
    larger = len({x for x, _ in shapes} - set(timed))
    how = (f"one DiT step per shape timed on this CPU ({len(timed)} "
           f"shape{'s' if len(timed) != 1 else ''}"
           + (f"; {larger} larger from FLOPs at the timed rate" if larger > 0 else "") + ")"
           if dit is not None else f"DiT FLOPs at an assumed {rate / 1e12:.2f} TFLOP/s"
           ) + "; VAE decode not counted"
    return total / cfg.concurrency[1], how


@torch.no_grad()
def _time_step(dit: VideoDiT, x_shape: tuple, text_len: int) -> float:
    x, t = torch.randn(x_shape), torch.full((x_shape[0],), 0.5)  # (B, C, T, H, W), (B,)
    text = torch.randn(x_shape[0], text_len, dit.config.text_dim)  # (B, L, D)
    dit(x, t, text)  # warm-up: RoPE cache, allocator
    t0 = time.perf_counter()
    dit(x, t, text)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the job


def _counts(plan: RenderPlan) -> dict:
    p = plan.parsed
    return {"lines": p.lines, "valid_rows": len(p.rows), "error_rows": len(p.errors),
            "videos": len(p.rows) * plan.cfg.num_per_prompt, "to_render": len(plan.todo),
            "already_done": plan.done}


def dry_run(plan: RenderPlan) -> dict:
    seconds, how = estimate_seconds(plan)
    report = {"dry_run": True, **_counts(plan), "eta_s": round(seconds, 3), "eta_method": how,
              "errors": [{"line": e.line, "error": e.error} for e in plan.parsed.errors]}
    print(f"[render] dry run: {report['lines']} lines, {report['valid_rows']} valid, "
          f"{report['error_rows']} errors; {report['to_render']} videos to render "
          f"({plan.done} already done); ETA ~{seconds:.0f} s ({how})", flush=True)
    for e in plan.parsed.errors[:20]:
        print(f"[render]   {plan.cfg.prompts}:{e.line}: {e.error}", flush=True)
    return report


def render_plan(plan: RenderPlan, t0: float | None = None) -> dict:
    """Write the prompt file's error rows, render what is left, then summary and index."""
    cfg, job, counts = plan.cfg, plan.job, _counts(plan)
    t0 = time.time() if t0 is None else t0
    errors = [mf.prompt_error_row(job, e) for e in plan.parsed.errors]
    if errors:
        mf.write_part(cfg.out, job.run, "prompts", errors)
    print(f"[render] {counts['valid_rows']} prompts ({counts['error_rows']} bad lines) -> "
          f"{counts['videos']} videos; {plan.done} already done"
          + (f" ({plan.changed} with other settings: kept, --overwrite redoes them)"
             if plan.changed else "") + f"; run {job.run}", flush=True)
    rendered: Counter = Counter()
    stopped = None
    try:
        if plan.todo:
            _execute(plan, rendered)
    except Exception as e:  # noqa: BLE001 - a storage failure inside Ray is unwrapped
        stopped = storage.failure_in(e)
        if stopped is None:
            raise
    summary = mf.summarize(rendered=rendered["ok"], skipped=plan.done,
                           failed=len(errors) + rendered["error"], wall_s=time.time() - t0,
                           out=cfg.out, run=job.run, model=cfg.model,
                           package_hash=job.package_hash, **counts,
                           **({"stopped": str(stopped)} if stopped else {}))
    try:
        mf.write_outputs(cfg.out, summary, title=f"t2v render: {Path(cfg.prompts).name}")
    except storage.StorageError as e:
        if stopped is None:
            raise
        print(f"[render] summary.json not written: {e}", flush=True)
    print(mf.summary_line(summary), flush=True)
    if stopped is not None:  # what was written is complete; a rerun renders the rest
        raise stopped
    return summary


PROGRESS_EVERY_S = 10.0
"""Seconds between two progress lines of a render."""


def _execute(plan: RenderPlan, counts: Counter) -> None:
    """Render `plan.todo`; `counts` (by status) grows as rows come back."""
    cfg, t0 = plan.cfg, time.time()
    batches = make_batches(plan.todo, cfg.batch_size)
    items = [{"index": i, "samples": SAMPLES.dump_json(b)} for i, b in enumerate(batches)]
    shapes = Counter(f"{s.frames}x{s.height}x{s.width} steps {s.steps}" for s in plan.todo)
    log.info("render: %d videos in %d batches (%s) on %d-%d actors", len(plan.todo),
             len(batches), dict(shapes), *cfg.concurrency)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    lo, hi = cfg.concurrency
    # Ray Data's actor defaults (max_restarts=-1, max_task_retries=-1) bring a renderer back on
    # another node and resend its batch.
    ds = ds.map_batches(Renderer, batch_size=1, fn_constructor_kwargs={"cfg": cfg, "job": plan.job},
                        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None)
    total, shown = len(plan.todo), 0.0
    for row in ds.iter_rows():
        counts[row["status"]] += 1
        done, elapsed = counts.total(), time.time() - t0
        if done < total and elapsed - shown < PROGRESS_EVERY_S and done > 1:
            continue  # a line for the first video, then one every PROGRESS_EVERY_S, the last
        shown = elapsed
        rate = done / max(elapsed, 1e-9)  # actor start-up included: a pessimistic ETA early on
        print(f"[render] {done}/{total} videos ({counts['error']} failed) | {rate:.2f} videos/s "
              f"| ETA {(total - done) / max(rate, 1e-9):.0f} s | {elapsed:.0f} s", flush=True)


def run_render_command(cfg: RenderConfig) -> dict:
    """`t2v render`: whole-job checks first (one line each), then join or start Ray, render.

    A dry run starts no Ray: validating and estimating need no cluster.
    """
    t0 = time.time()
    check_output_uri(cfg.out)
    plan = plan_render(cfg)
    if cfg.dry_run:
        return dry_run(plan)
    ensure_ray()
    return render_plan(plan, t0=t0)
