"""The Ray Train worker loop: DeepSpeed ZeRO around a pure-torch model (thin orchestration).

One function, `train_loop_per_worker`, runs on every worker. The model files never mention
distribution: DeepSpeed wraps the model here, from outside. Per-sample noise, timesteps and
caption dropout come from (seed, step, sample key), so the training signal does not depend on the
worker count, the ZeRO stage or the micro-batch split.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray.train
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from t2v import storage
from t2v.config import TrainConfig
from t2v.diffusion.flow import noisy, velocity_target
from t2v.train.schedule import EMA, lr_factor, per_sample_generators

if TYPE_CHECKING:
    from t2v.models.dit import DiTConfig

CKPT_TAG = "ds"


# ----------------------------------------------------------------------------- model + engine


def dit_geometry(cfg: TrainConfig, latent_channels: int, text_dim: int) -> DiTConfig:
    """The DiT config of a run: `init_from`'s own (an imported Wan model keeps its geometry and
    text convention; model/model_overrides are ignored) or the preset with overrides."""
    from t2v.models.dit import DiTConfig, dit_config

    if not cfg.init_from:
        over = {"in_channels": latent_channels, "text_dim": text_dim,
                "checkpointing": cfg.activation_checkpointing, **cfg.model_overrides}
        return dit_config(cfg.model, **over)
    from t2v.models.package import read_meta

    meta = read_meta(cfg.init_from)
    if meta.dit is None:
        raise ValueError(f"init_from={cfg.init_from}: the package has no DiT")
    if (meta.dit.in_channels, meta.dit.text_dim) != (latent_channels, text_dim):
        raise ValueError(f"init_from={cfg.init_from}: DiT takes {meta.dit.in_channels} latent "
                         f"channels and text width {meta.dit.text_dim}, the data has "
                         f"{latent_channels} and {text_dim} (encode with that package's VAE "
                         "and text encoder)")
    return DiTConfig.from_dict({**meta.dit.to_dict(),
                                "checkpointing": cfg.activation_checkpointing})


def build_model(cfg: TrainConfig, data_info: dict) -> nn.Module:
    """The trainable module, from a preset (+ overrides) or from `init_from`'s package, with
    LoRA adapters when `lora.rank` > 0 (base frozen, adapters trainable)."""
    if cfg.stage == "vae":
        from t2v.models.vae import CausalVideoVAE, vae_config

        model = CausalVideoVAE(vae_config(cfg.model, **cfg.model_overrides))
    else:
        from t2v.models.dit import VideoDiT

        model = VideoDiT(dit_geometry(cfg, data_info["latent_channels"], data_info["text_dim"]))
    if cfg.init_from:
        from t2v.models.package import load_package

        pkg = load_package(cfg.init_from, load_text=False, load_dit=cfg.stage == "dit",
                           load_vae=cfg.stage == "vae")
        src = pkg.vae if cfg.stage == "vae" else pkg.dit  # a package's LoRA is merged in
        if src is None:
            raise ValueError(f"init_from={cfg.init_from}: package has no {cfg.stage} weights")
        model.load_state_dict(src.state_dict(), strict=True)
    if cfg.lora.rank:
        from t2v.models.lora import add_lora

        check_lora(cfg)
        model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                         cfg.lora.target_modules)
    return model


def check_lora(cfg: TrainConfig) -> None:
    """LoRA adapts a pretrained DiT: refuse it for the VAE or from a random init."""
    if cfg.lora.rank and (cfg.stage != "dit" or not cfg.init_from):
        raise ValueError(f"lora.rank={cfg.lora.rank} needs stage dit and init_from=PACKAGE "
                         f"(got stage {cfg.stage}, init_from {cfg.init_from!r})")


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # Our optimizer is torch's AdamW: no JIT-compiled fused kernels needed (NOTES-stack).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def full_params(engine, zero_stage: int):
    """(name, full tensor) of the trainable parameters (frozen ones never change: a LoRA run's
    EMA needs only its adapters); under ZeRO-3 gathers the partitions (a collective)."""
    import contextlib

    import deepspeed

    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ctx = (deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
           if zero_stage == 3 else contextlib.nullcontext())
    with ctx:
        yield from params


# ----------------------------------------------------------------------------- batches + losses


class OnTheFlyEncoder:
    """Stage dit on RAW shards: the VAE and text encoder turn each batch into latents here."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from t2v.models.package import load_package
        from t2v.models.text import TextEncoder, TextEncoderConfig

        self.vae = load_package(cfg.vae, load_text=False, load_dit=False).vae.to(device)
        self.text = TextEncoder(TextEncoderConfig(ref=cfg.data.text_encoder,
                                                  max_length=cfg.data.text_max_length)).to(device)

    @torch.no_grad()
    def __call__(self, batch, device: torch.device):
        from t2v.data.latents import LatentBatch

        video = batch.video.to(device).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)
        emb, mask = self.text(batch.captions)  # (B, L, D), (B, L)
        return LatentBatch(latent=self.vae.encode_latents(video), text=emb, mask=mask,
                           captions=batch.captions, keys=batch.keys)


class StepInputs:
    """A micro-batch moved to the device, with the sample keys for per-sample randomness."""

    def __init__(self, batch, device: torch.device, dtype: torch.dtype) -> None:
        self.keys: list[str] = batch.keys
        if hasattr(batch, "latent"):  # latent shards (stage dit)
            self.x = batch.latent.to(device, dtype)  # (B, C, T', H', W')
            self.text = batch.text.to(device, dtype)  # (B, L, D)
            self.mask = batch.mask.to(device)  # (B, L)
        else:  # raw clips (stage vae): (B, T, 3, H, W) -> (B, 3, T, H, W)
            self.x = batch.video.to(device, dtype).permute(0, 2, 1, 3, 4).contiguous()
            self.text = self.mask = None


def dit_loss(engine, inp: StepInputs, cfg: TrainConfig, step: int, empty: tuple[Tensor, Tensor],
             ) -> Tensor:
    """Rectified flow with per-sample (t, eps, caption dropout) keyed by (seed, step, key)."""
    from t2v.diffusion.flow import sample_t

    gens = per_sample_generators(cfg.seed, step, inp.keys)
    shape = inp.x.shape[1:]
    eps = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(inp.x)  # (B, C, T, H, W)
    t = torch.cat([sample_t(1, generator=g) for g in gens]).to(inp.x)  # (B,)
    drop = torch.tensor([torch.rand((), generator=g).item() < cfg.caption_dropout
                         for g in gens], device=inp.x.device)  # (B,)
    text = torch.where(drop[:, None, None], empty[0].to(inp.text), inp.text)
    mask = torch.where(drop[:, None], empty[1].to(inp.mask), inp.mask)
    v = engine(noisy(inp.x, eps, t), t, text, mask)  # (B, C, T, H, W)
    return (v.float() - velocity_target(inp.x, eps).float()).pow(2).mean()


def vae_loss(engine, inp: StepInputs, cfg: TrainConfig, step: int) -> Tensor:
    recon, posterior = engine(inp.x)
    return engine.module.loss(inp.x, recon, posterior, kl_weight=cfg.kl_weight)["total"]


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, ema: EMA, state: dict, rank: int, metrics: dict) -> None:
    """Every rank writes its ZeRO partition; rank 0 adds EMA + trainer state; Ray merges them."""
    with tempfile.TemporaryDirectory(prefix="t2v-ckpt-") as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)
        if rank == 0:
            save_file(ema.state_dict(), os.path.join(d, "ema.safetensors"))
            Path(d, "trainer.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restore_checkpoint(engine, ema: EMA) -> dict | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        # DeepSpeed's own checkpoint files are torch pickles of OUR run's state (trusted, never a
        # user-supplied file); the exported model package is safetensors only.
        engine.load_checkpoint(d, tag=CKPT_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        ema.load_state_dict(load_file(os.path.join(d, "ema.safetensors")))
        return json.loads(Path(d, "trainer.json").read_text())


def maybe_inject_fault(cfg: TrainConfig, step: int, rank: int, run_uri: str) -> None:
    """Test hook: SIGKILL this worker once at `fault.kill_at_step` (after that step's checkpoint)."""
    f = cfg.fault
    if f.kill_at_step != step or f.kill_rank != rank:
        return
    marker = storage.join(run_uri, "fault_injected.json")
    if storage.exists(marker):
        return
    # Kill only once Ray Train has registered this step's checkpoint (its snapshot names it):
    # the point of the hook is "a worker dies after a checkpoint", not a race with the report.
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    deadline = time.time() + 120
    while time.time() < deadline:
        if storage.exists(snapshot):
            latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step", 0) >= step:
                break
        time.sleep(0.5)
    storage.write_text(marker, json.dumps({"step": step, "rank": rank, "pid": os.getpid()}))
    print(f"[t2v] fault injection: SIGKILL rank {rank} at step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    import deepspeed

    from t2v.train.monitor import Monitor
    from t2v.train.validation import Validator

    cfg = TrainConfig.model_validate(config["train"])
    data_info, run_uri = config["data_info"], config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_gpu)
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = build_model(cfg, data_info).to(device)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters only
    opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, warmup=cfg.optim.warmup_steps, total=cfg.steps, kind=cfg.optim.schedule,
        min_ratio=cfg.optim.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, bf16),
                                           dist_init_required=False)
    dtype = torch.bfloat16 if bf16 else torch.float32

    state = restore_checkpoint(engine, ema) or {"step": 0, "samples": 0}
    step = int(state["step"])
    if rank == 0:
        print(f"[t2v] {cfg.stage} run {cfg.name}: {'resumed at' if step else 'starting at'} "
              f"step {step}/{cfg.steps}, {world} workers, ZeRO-{cfg.zero_stage}, "
              f"{'bf16' if bf16 else 'fp32'}, {sum(p.numel() for p in model.parameters()):,} "
              f"params ({sum(p.numel() for p in trainable):,} trainable"
              f"{f', LoRA rank {cfg.lora.rank}' if cfg.lora.rank else ''})", flush=True)
    empty = None
    if cfg.stage == "dit":
        empty = tuple(torch.from_numpy(a) for a in data_info["empty_text"])
        empty = (empty[0].float().to(device), empty[1].bool().to(device))
    encoder = (OnTheFlyEncoder(cfg, device) if cfg.stage == "dit" and cfg.data.encode_on_the_fly
               else None)
    validator = Validator(cfg, data_info, run_uri, device, rank) if rank == 0 else None
    monitor = Monitor(cfg, data_info, run_uri, rank, world)
    monitor.start(step)

    shard = ray.train.get_dataset_shard("train")
    micro = 0
    while step < cfg.steps:
        batches = shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True,
                                           collate_fn=config["collate"],
                                           local_shuffle_buffer_size=cfg.data.local_shuffle_buffer
                                           or None, local_shuffle_seed=cfg.seed + step)
        monitor.wait_start()
        for batch in batches:
            monitor.got_batch(len(batch.keys))
            if encoder is not None:
                batch = encoder(batch, device)
            inp = StepInputs(batch, device, dtype)
            loss = (dit_loss(engine, inp, cfg, step, empty) if cfg.stage == "dit"
                    else vae_loss(engine, inp, cfg, step))
            engine.backward(loss)
            engine.step()
            monitor.add_loss(loss.detach())
            micro += 1
            if micro % cfg.grad_accum:
                monitor.wait_start()
                continue
            step += 1
            state = {"step": step, "samples": state["samples"] + cfg.batch_size * world
                     * cfg.grad_accum}
            ema.update(full_params(engine, cfg.zero_stage))
            metrics = monitor.step_done(step, engine)
            if validator is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                val = validator.run(ema.module, step)
                monitor.record({"step": step, "val": val})
                metrics |= {f"val_{k}": v for k, v in val.items()}
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(engine, ema, state, rank, metrics | {"step": step})
                maybe_inject_fault(cfg, step, rank, run_uri)
            elif metrics.get("logged"):
                ray.train.report(metrics | {"step": step})
            if step >= cfg.steps:
                break
            monitor.wait_start()
    if validator is not None:
        validator.export(ema.module, step)
    monitor.close()
