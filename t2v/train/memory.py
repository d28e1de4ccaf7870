"""`t2v train --dry-run`: bytes per rank of a DiT run, before anyone pays for the GPUs.

Model states per rank, for P parameters (T of them trainable), W ranks, p = 2 bytes in bf16 else
4 (mixed precision keeps an fp32 master copy in the optimizer), AdamW:

    weights    p * P            ZeRO-3: / W
    gradients  p * T            ZeRO-2, 3: / W
    optimizer  (8 + 4 [master]) * T   ZeRO-1, 2, 3: / W   (exp_avg, exp_avg_sq, fp32 master:
                                                      bf16, or ZeRO-1/2, whose partition is
                                                      a copy even in fp32; ZeRO-3 in fp32
                                                      steps the weights' own partition,
                                                      zero.share_fp32_partitions)
    EMA        4 * T / W        fp32, sharded W ways at every stage (t2v/train/zero.py)

Activations saved for backward, per micro-batch sample, p bytes each, for n video tokens, L text
tokens, width d, MLP width f, depth D (counted on VideoDiT with autograd's saved-tensor hooks;
SDPA keeps no n x n matrix; tests/test_train_units.py checks the count on other shapes):

    D * (n * (24 d + 2 f) + 6 L d)                   without activation checkpointing
    D * n * d + n * (24 d + 2 f) + 6 L d             with it (block inputs + one block again)

Not counted: the CUDA context (~0.5-1 GiB), allocator fragmentation, communication buckets, the
VAE/text encoder of on-the-fly encoding. Hence the 85 % line in the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from t2v.config import TrainConfig
from t2v.data.shards import read_index
from t2v.models.dit import DiTConfig, VideoDiT, dit_config
from t2v.models.package import read_meta
from t2v.train.dit_task import dit_geometry

GiB = 2**30
HEADROOM = 0.85
"""Share of the device memory the estimate may fill before the verdict says it will not fit."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank (formulas in the module docstring)."""

    ranks: int
    zero_stage: int
    bf16: bool
    params: int
    trainable: int
    tokens: int
    """Video tokens per sample."""
    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations

    def table(self, device_gib: float | None = None) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients),
                ("optimizer", self.optimizer), ("EMA", self.ema),
                ("activations", self.activations), ("total", self.total)]
        head = (f"{_count(self.params)} params ({_count(self.trainable)} trainable), "
                f"{self.tokens:,} tokens x micro-batch {self.micro_batch}, {self.ranks} ranks, "
                f"ZeRO-{self.zero_stage}, {'bf16' if self.bf16 else 'fp32'}; per rank:")
        lines = [head] + [f"  {name:<12}{_size(b):>11}" for name, b in rows]
        if device_gib:
            fits = self.total <= HEADROOM * device_gib * GiB
            lines.append(f"  {'verdict':<12}{'fits' if fits else 'DOES NOT FIT'} in "
                         f"{device_gib:g} GiB ({self.total / (device_gib * GiB):.0%}; "
                         f"keep <= {HEADROOM:.0%} for the CUDA context and fragmentation)")
        return "\n".join(lines)


def _count(n: int) -> str:
    return next(f"{n / k:.2f}{u}" for k, u in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
                if n >= k or k == 1)


def _size(b: int) -> str:
    return next(f"{b / k:.2f} {u}" for k, u in ((GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB"),
                                                 (1, "B")) if b >= k or k == 1)


def activation_elements(cfg: DiTConfig, tokens: int, text_len: int,
                        checkpointing: bool) -> int:
    """Elements autograd keeps for backward, per sample (module docstring)."""
    block = tokens * (24 * cfg.dim + 2 * cfg.ffn_dim) + 6 * text_len * cfg.dim
    if checkpointing:
        return cfg.depth * tokens * cfg.dim + block
    return cfg.depth * block


def estimate_memory(model: DiTConfig, latent_shape: tuple[int, int, int, int], text_len: int,
                    cfg: TrainConfig, bf16: bool, trainable: int | None = None) -> MemoryEstimate:
    with_meta = _meta_model(model)
    params = sum(p.numel() for p in with_meta.parameters())
    trainable = params if trainable is None else trainable
    tokens = math.prod(with_meta.grid((1, *latent_shape)))
    # Sequence parallelism: a rank keeps 1/P of the tokens, and its self-attention all P times
    # as many tokens with 1/P of the heads: the same elements as 1/P of the sequence.
    local_tokens = -(-tokens // cfg.sequence_parallel)
    # Elastic [MIN, MAX]: the fewest ranks hold the most per rank.
    w, z, p = cfg.min_workers, cfg.zero_stage, 2 if bf16 else 4
    return MemoryEstimate(
        ranks=w, zero_stage=z, bf16=bf16, params=params, trainable=trainable, tokens=tokens,
        micro_batch=cfg.batch_size,
        weights=p * params // (w if z >= 3 else 1),
        gradients=p * trainable // (w if z >= 2 else 1),
        optimizer=(8 + (4 if bf16 or z in (1, 2) else 0)) * trainable // (w if z >= 1 else 1),
        ema=4 * trainable // w,
        activations=p * cfg.batch_size * activation_elements(
            model, local_tokens, text_len, cfg.activation_checkpointing))


def _meta_model(model: DiTConfig) -> VideoDiT:
    with torch.device("meta"):  # shapes only: no memory, no init
        return VideoDiT(model)


def dry_run(cfg: TrainConfig) -> dict:
    """The estimate of a DiT run from its config alone: the latent geometry from the shards'
    index (or data.frames/size and the VAE package), the DiT from the preset or init_from.
    Reads two small JSON files; starts nothing."""
    if cfg.stage != "dit":
        raise ValueError("train --dry-run: estimates stage dit (the VAE stage is small)")
    latent_shape, text_len, text_dim = _data_geometry(cfg)
    if text_dim is None:  # only the text encoder itself would say: take the DiT's own
        text_dim = (read_meta(cfg.init_from).dit.text_dim if cfg.init_from
                    else dit_config(cfg.model).text_dim)
    model = dit_geometry(cfg, latent_shape[0], text_dim)  # checks init_from against the data
    trainable = _lora_params(model, cfg) if cfg.lora.rank else None  # adapters only
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cfg.use_gpu)
    est = estimate_memory(model, latent_shape, text_len, cfg, bf16, trainable)
    device_gib = cfg.device_memory_gib if cfg.use_gpu else None
    print(f"[t2v] train --dry-run '{cfg.name}': latents {latent_shape}, text {text_len} "
          f"tokens\n{est.table(device_gib)}", flush=True)
    return {"dry_run": True, "per_rank_gib": round(est.total / GiB, 3),
            "fits": None if device_gib is None else est.total <= HEADROOM * device_gib * GiB,
            **{k: getattr(est, k) for k in ("params", "trainable", "tokens", "weights",
                                             "gradients", "optimizer", "ema", "activations")}}


def _data_geometry(cfg: TrainConfig) -> tuple[tuple[int, int, int, int], int, int | None]:
    """((C, T', H', W'), text tokens, text width or None) of a training sample, reading no
    sample: latent shards' index records all three; raw clips leave the width unknown."""
    data = cfg.data
    if data.shards and not data.encode_on_the_fly:
        index = read_index(data.shards)
        shapes = index.get("latent_shapes") or []
        if not shapes:
            raise ValueError(f"{data.shards}: the index records no latent shapes")
        text_dim = index.get("text_dim")
        return (tuple(max(shapes, key=math.prod)), int(index["max_length"]),
                None if text_dim is None else int(text_dim))
    if not (cfg.vae and data.size):
        raise ValueError("train --dry-run: give data.shards (latent shards), or vae=PACKAGE with "
                         "data.frames and data.size (the clip the run will encode)")
    meta = read_meta(cfg.vae)
    vae = meta.vae
    t = 1 + (data.frames - 1) // vae.temporal_down
    shape = (vae.latent_channels, t, data.size // vae.spatial_down, data.size // vae.spatial_down)
    return shape, data.text_max_length or meta.text.max_length, None


def _lora_params(model: DiTConfig, cfg: TrainConfig) -> int:
    from t2v.models.lora import add_lora  # noqa: PLC0415 - peft: only LoRA runs need it

    meta_model = _meta_model(model)
    add_lora(meta_model, cfg.lora.rank, cfg.lora.alpha, targets=cfg.lora.target_modules)
    return sum(p.numel() for n, p in meta_model.named_parameters() if "lora_" in n)
