"""Stage `dit`: the VideoDiT on latent shards (or on raw shards, encoded batch by batch), trained
with `t2v.diffusion.flow`'s rectified-flow loss and exported as a full model package whose
render defaults are the geometry of the data the run saw."""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from t2v.config import ReaderConfig, TrainConfig
from t2v.data.buckets import Bucket
from t2v.data.collate import LatentBatch, LatentCollate, VideoBatch, VideoCollate
from t2v.data.latents import latent_stream, read_empty_caption
from t2v.data.shards import iter_shard_samples, other_captions, read_index
from t2v.data.streaming import video_stream
from t2v.data.tensors import to_model_range, to_uint8
from t2v.data.video import contact_sheet
from t2v.diffusion.flow import flow_loss, heldout_flow_loss, sample_t
from t2v.diffusion.sampling import denoise, get_noise
from t2v.models.dit import DiTConfig, VideoDiT, Whole, dit_config
from t2v.models.lora import add_lora, export_dit, lora_scale, target_layers
from t2v.models.package import (
    PackageMeta,
    RenderDefaults,
    dit_weights,
    load_package,
    read_meta,
    save_package,
)
from t2v.models.sequence_parallel import parallelize
from t2v.models.text import TextEncoder, TextEncoderConfig, shared_text_encoder
from t2v.train.schedule import per_sample_generators, train_flops
from t2v.train.task import (
    VAL_COUNT,
    DataInfo,
    StageTask,
    Validation,
    clip_fps,
    load_weights,
    read_clips,
)

VAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)
"""Fixed timesteps of the held-out flow loss."""
VAL_CFG = 5.0
"""Guidance scale of the validation sample videos."""


@dataclass
class DiTData(DataInfo):
    latent_shape: tuple[int, int, int, int]
    """(C, T', H', W') of one training sample."""
    text_encoder: TextEncoderConfig
    shift: float
    """Timestep shift of training t (recorded as the package's render shift)."""
    empty_text: np.ndarray
    """(L, D) float32: the unconditional input that dropped captions get."""
    empty_mask: np.ndarray
    """(L,) bool."""
    val_latent: np.ndarray
    """(N, C, T', H', W') float32 held-out latents."""
    val_text: np.ndarray
    """(N, L, D) float32."""
    val_mask: np.ndarray
    """(N, L) bool."""
    val_captions: list[str]


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would build its kernels with:
    $CXX, else g++ / c++ / clang++ on PATH; None when there is none (`compile: true` on a CPU
    is then refused before Ray starts)."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def pixel_geometry(vae, t: int, h: int, w: int) -> tuple[int, int, int]:
    """(frames, height, width) of the clip a (T', H', W') latent of `vae` (its config) encodes:
    1 + k latent frames are 1 + k * temporal_down frames."""
    return 1 + (t - 1) * vae.temporal_down, h * vae.spatial_down, w * vae.spatial_down


def dit_geometry(cfg: TrainConfig, latent_channels: int, text_dim: int) -> DiTConfig:
    """The DiT config of a run: `init_from`'s own (an imported Wan model keeps its geometry and
    text convention; model/model_overrides are ignored) or the preset with overrides."""
    if not cfg.init_from:
        over = {"in_channels": latent_channels, "text_dim": text_dim, **cfg.model_overrides}
        return dit_config(cfg.model, **over)
    meta = read_meta(cfg.init_from)
    if meta.dit is None:
        raise ValueError(f"init_from={cfg.init_from}: the package has no DiT")
    if (meta.dit.in_channels, meta.dit.text_dim) != (latent_channels, text_dim):
        raise ValueError(f"init_from={cfg.init_from}: DiT takes {meta.dit.in_channels} latent "
                         f"channels and text width {meta.dit.text_dim}, the data has "
                         f"{latent_channels} and {text_dim} (encode with that package's VAE "
                         "and text encoder)")
    return meta.dit


class OnTheFlyEncoder:
    """Raw clips -> latents and caption embeddings, in the worker (data.encode_on_the_fly)."""

    def __init__(self, vae_uri: str, text: TextEncoderConfig, device: torch.device) -> None:
        self.vae = load_package(vae_uri, load_text=False, load_dit=False).vae.to(device)
        self.text = TextEncoder(text).to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: VideoBatch, alternatives: bool = False) -> LatentBatch:
        """With `alternatives`, the clips' json `captions` are embedded too (alt_text)."""
        emb, mask = self.text(batch.captions)  # (B, L, D), (B, L)
        latent = self.vae.encode_latents(batch.video.to(self.device))  # (B, C, T', H', W')
        alt_text = alt_mask = None
        alts = [_captions(m) if alternatives else [] for m in batch.meta]
        if any(alts):
            k = max(map(len, alts))
            flat = [c for a in alts for c in a]
            e, m = self.text(flat)  # (N, L, D), (N, L)
            alt_text = e.new_zeros(len(alts), k, *e.shape[1:])
            alt_mask = m.new_zeros(len(alts), k, m.shape[1])
            at = 0
            for i, a in enumerate(alts):
                alt_text[i, :len(a)], alt_mask[i, :len(a)] = e[at:at + len(a)], m[at:at + len(a)]
                at += len(a)
        return LatentBatch(latent=latent, text=emb, mask=mask, captions=batch.captions,
                           keys=batch.keys, alt_text=alt_text, alt_mask=alt_mask)


def alternative_captions(text: Tensor, mask: Tensor, alt_text: Tensor, alt_mask: Tensor,
                         gens: list[torch.Generator], prob: float) -> tuple[Tensor, Tensor, int]:
    """Each sample's caption, or with probability `prob` one of its alternatives (uniformly):
    text (B, L, D), mask (B, L) from alt_text (B, K, L, D), alt_mask (B, K, L) (an alternative
    a sample lacks has an all-False mask). Two draws from each sample's generator (keyed by
    seed, step and key: the same choice whatever the worker count or micro-batch split).
    Returns (text, mask, how many samples took an alternative)."""
    have = alt_mask.any(-1).cpu()  # (B, K)
    text, mask, used = text.clone(), mask.clone(), 0
    for i, g in enumerate(gens):
        use, pick = torch.rand((), generator=g).item() < prob, torch.rand((), generator=g).item()
        choices = torch.nonzero(have[i]).flatten()
        if use and len(choices):
            k = int(choices[min(int(pick * len(choices)), len(choices) - 1)])
            text[i], mask[i] = alt_text[i, k], alt_mask[i, k]
            used += 1
    return text, mask, used


def _captions(meta: dict) -> list[str]:
    """A raw clip's alternative captions as encode reads them; a malformed field gives none
    (the clip still trains on its caption)."""
    try:
        return other_captions(meta, str(meta.get("caption") or "").strip())
    except ValueError:
        return []


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class DiTTask(StageTask):
    stage = "dit"
    info: DiTData

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.init_meta: PackageMeta | None = read_meta(cfg.init_from) if cfg.init_from else None

    @property
    def count_names(self) -> tuple[str, ...]:
        return ("alt_caption",) if self.cfg.alt_caption_prob else ()

    def check(self) -> None:
        if not self.cfg.vae:
            raise ValueError("train: stage dit needs vae=PACKAGE (the VAE the latents were made "
                             "with)")
        if self.cfg.data.crop is not None:
            raise ValueError(f"data.crop={self.cfg.data.crop} is for stage vae (the DiT trains "
                             "on whole clips' latents)")
        if self.cfg.lora.rank and not self.cfg.init_from:
            raise ValueError(f"lora.rank={self.cfg.lora.rank} needs stage dit and init_from="
                             "PACKAGE (got init_from None)")
        sp = self.cfg.sequence_parallel
        if self.cfg.compile:
            if self.cfg.zero_stage == 3 or sp > 1:
                raise ValueError("compile=true needs zero_stage <= 2 and sequence_parallel 1 "
                                 f"(got zero_stage {self.cfg.zero_stage}, sequence_parallel "
                                 f"{sp}): ZeRO-3's gathers and the all-to-alls run outside "
                                 "compiled blocks")
            if not self.cfg.use_gpu and cpp_compiler() is None:
                raise ValueError("compile=true on a CPU needs a C++ compiler (g++, or set $CXX; "
                                 "Debian: apt install g++), or set compile=false")
        if sp > 1 and not (self.init_meta and self.init_meta.dit is None):  # that: dit_geometry
            dit, source = ((self.init_meta.dit, f"init_from={self.cfg.init_from}")
                           if self.init_meta else
                           (dit_config(self.cfg.model, **self.cfg.model_overrides),
                            f"model {self.cfg.model}"))
            if dit.heads % sp:
                raise ValueError(f"sequence_parallel={sp} must divide the {dit.heads} attention "
                                 f"heads of {source}")

    def _text_config(self) -> TextEncoderConfig:
        data = self.cfg.data
        if data.encode_on_the_fly:
            return read_meta(self.cfg.vae).text.overridden(data.text_encoder,
                                                           data.text_max_length)
        return TextEncoderConfig.from_dict(read_index(data.shards)["text_encoder"])

    def _held_out(self, val_uri: str, text: TextEncoder | None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[dict]]:
        """(latents, text, mask, captions, sample metas) of up to VAL_COUNT held-out samples."""
        cfg = self.cfg
        if cfg.data.encode_on_the_fly:
            clips = read_clips(val_uri, cfg.data.frames, cfg.data.size, VAL_COUNT)
            vae = load_package(cfg.vae, load_text=False, load_dit=False).vae
            with torch.no_grad():
                latent = vae.encode_latents(to_model_range(np.stack([c.frames for c in clips])))
            captions = [c.caption for c in clips]
            emb, mask = text(captions)
            return latent.numpy(), emb.numpy(), mask.numpy(), captions, [c.meta for c in clips]
        # Bucketed shards mix shapes: validate on the most common one among the first samples.
        by_shape: dict[tuple[int, ...], list] = {}
        for n, (_key, f) in enumerate(iter_shard_samples([val_uri])):
            latent = _npy(f["latent.npy"])
            rows = by_shape.setdefault(latent.shape, [])
            rows.append((latent, _npy(f["text.npy"]), _npy(f["mask.npy"]), f["txt"].decode(),
                         json.loads(f["json"]) if "json" in f else {}))
            if len(rows) == VAL_COUNT or n + 1 == 8 * VAL_COUNT:
                break
        if not by_shape:
            raise ValueError(f"{val_uri}: the held-out latent shard has no sample")
        rows = max(by_shape.values(), key=len)
        return (np.stack([r[0] for r in rows]).astype(np.float32),
                np.stack([r[1] for r in rows]).astype(np.float32),
                np.stack([r[2] for r in rows]).astype(bool), [r[3] for r in rows],
                [r[4] for r in rows])

    def describe_data(self, val_uri: str, buckets: dict[str, int]) -> DiTData:
        cfg = self.cfg
        text_cfg = self._text_config()
        # Latents carry their held-out captions' embeddings and, since encode writes it, the
        # empty caption's (latents.EMPTY_CAPTION): then this driver loads no text encoder.
        on_the_fly = cfg.data.encode_on_the_fly
        stored = None if on_the_fly else read_empty_caption(cfg.data.shards)
        encoder = shared_text_encoder(text_cfg) if on_the_fly or stored is None else None
        latent, text, mask, captions, metas = self._held_out(val_uri, encoder)
        if stored is None:
            emb, emb_mask = encoder([""])  # (1, L, D), (1, L)
            stored = emb[0].numpy(), emb_mask[0].numpy()
        empty, empty_mask = stored
        c, t, h, w = latent.shape[1:]
        vae = read_meta(cfg.vae).vae
        if vae is None:
            raise ValueError(f"vae={cfg.vae}: the package has no VAE")
        with torch.device("meta"):  # shapes and FLOPs only
            probe = VideoDiT(dit_geometry(cfg, c, int(empty.shape[-1])))
        if cfg.lora.rank:  # a bad target name fails here, once, not in every worker
            target_layers(probe, cfg.lora.target_modules)
        init_render = self.init_meta.render if self.init_meta else None
        shift = cfg.shift or (init_render.shift if init_render else 1.0)
        # A masking DiT drops the padding no sample of a batch uses (VideoDiT.embed): count the
        # longest held-out prompt's tokens, not the encoder's max_length.
        text_len = (int(mask.sum(axis=1).max()) if probe.config.text_mask and mask.size
                    else text_cfg.max_length)
        # The latents fix the geometry; bucketed data: the bucket with the most training samples
        # (its render default).
        frames, height, width = pixel_geometry(vae, t, h, w)
        if len(buckets) > 1:
            top = max(map(Bucket.parse, buckets), key=lambda b: (  # ties: the larger one
                buckets[b.name], b.frames * b.height * b.width))
            frames, height, width = top.frames, top.height, top.width
        return DiTData(
            frames=frames, height=height, width=width, fps=clip_fps(metas), buckets=buckets,
            tokens_per_sample=int(np.prod(probe.grid((1, c, t, h, w)))),
            train_flops_per_sample=train_flops(probe.flops((1, c, t, h, w), text_len)),
            latent_shape=(c, t, h, w), text_encoder=text_cfg, shift=float(shift),
            empty_text=empty, empty_mask=empty_mask,
            val_latent=latent, val_text=text, val_mask=mask, val_captions=captions)

    def bucket_column(self, buckets: dict[str, int]) -> str | None:
        if self.cfg.data.encode_on_the_fly:
            return super().bucket_column(buckets)
        return "latent" if len(buckets) > 1 else None

    def bucket_of(self, batch: LatentBatch) -> str:
        return "x".join(map(str, pixel_geometry(self.vae_config, *batch.latent.shape[-3:])))

    def dataset(self, train: list[str], clock):  # noqa: ANN001, ANN201
        data = self.cfg.data
        if data.encode_on_the_fly:
            reader = ReaderConfig(shards=data.shards, frames=data.frames, size=data.size,
                                  shuffle_seed=data.shuffle_seed)
            return video_stream(reader, uris=train, clock=clock).dataset, VideoCollate()
        index = read_index(data.shards)
        return (latent_stream(train, shuffle_seed=data.shuffle_seed, clock=clock,
                              text_tokens=index.get("text_tokens"),
                              alternatives=bool(self.cfg.alt_caption_prob)),
                LatentCollate(text_length=index.get("max_length")))

    # ------------------------------------------------------------------------- workers

    def build_model(self, info: DiTData, whole: Whole | None = None) -> nn.Module:
        """From the preset (+ overrides) or `init_from`'s package (its LoRA merged in), with
        LoRA adapters when `lora.rank` > 0 (base frozen, adapters trainable)."""
        cfg = self.cfg
        model = VideoDiT(dit_geometry(cfg, info.latent_shape[0], info.empty_text.shape[-1]),
                         whole)
        if cfg.init_from:  # read a tensor at a time, into the (maybe partitioned) model
            with dit_weights(cfg.init_from) as weights:
                load_weights(model, weights, whole)
        model.checkpointing = cfg.activation_checkpointing
        if cfg.lora.rank:
            model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                             cfg.lora.target_modules, whole)
        return model

    def parallelize(self, model: nn.Module, group: object) -> nn.Module:
        return parallelize(model, group)  # LoRA adapters sit inside the VideoDiT's layers

    def compile(self, model: nn.Module) -> None:
        model.compile_blocks()  # traced on the first step, with LoRA's layers in

    def setup(self, info: DiTData, device: torch.device, dtype: torch.dtype,
              rank: int) -> None:
        super().setup(info, device, dtype, rank)
        self.empty = (torch.tensor(info.empty_text, dtype=torch.float32, device=device),  # (L, D)
                      torch.tensor(info.empty_mask, dtype=torch.bool, device=device))  # (L,)
        self.encoder = (OnTheFlyEncoder(self.cfg.vae, info.text_encoder, device)
                        if self.cfg.data.encode_on_the_fly else None)
        self.vae_config = read_meta(self.cfg.vae).vae  # names the buckets of latent batches
        self.vae = None
        if rank == 0 and self.cfg.val_samples:  # decodes the validation sample videos
            self.vae = load_package(self.cfg.vae, load_text=False, load_dit=False).vae.to(device)

    def loss(self, engine: nn.Module, batch: LatentBatch | VideoBatch, step: int) -> Tensor:
        """Rectified flow with per-sample (eps, t, caption dropout) keyed by (seed, step, key):
        the same signal whatever the worker count, ZeRO stage or micro-batch split."""
        if self.encoder is not None:
            batch = self.encoder(batch, alternatives=bool(self.cfg.alt_caption_prob))
        x = batch.latent.to(self.device, self.dtype)  # (B, C, T', H', W')
        text = batch.text.to(self.device, self.dtype)  # (B, L, D)
        mask = batch.mask.to(self.device)  # (B, L)
        gens = per_sample_generators(self.cfg.seed, step, batch.keys)
        eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x)
        t = torch.cat([sample_t(1, generator=g, shift=self.info.shift) for g in gens]).to(x)
        drop = torch.tensor([torch.rand((), generator=g).item() < self.cfg.caption_dropout
                             for g in gens], device=x.device)  # (B,)
        if self.cfg.alt_caption_prob and batch.alt_text is not None:
            text, mask, used = alternative_captions(text, mask, batch.alt_text.to(text),
                                                    batch.alt_mask.to(mask), gens,
                                                    self.cfg.alt_caption_prob)
            self.counted["alt_caption"] += used
        text = torch.where(drop[:, None, None], self.empty[0].to(text), text)
        mask = torch.where(drop[:, None], self.empty[1], mask)
        return flow_loss(engine, x, text, mask, t=t, eps=eps)

    # ------------------------------------------------------------------------- rank 0

    def validate(self, module: nn.Module, step: int) -> Validation:
        info, dev = self.info, self.device
        x0 = torch.from_numpy(info.val_latent).to(dev)  # (N, C, T', H', W')
        text = torch.from_numpy(info.val_text).to(dev)  # (N, L, D)
        mask = torch.from_numpy(info.val_mask).to(dev)  # (N, L)
        losses = heldout_flow_loss(module, x0, text, mask, t_values=VAL_T, seed=0)
        metrics = {f"flow_loss_t{t:.1f}": float(v) for t, v in losses.items()}
        metrics["flow_loss"] = float(np.mean(list(losses.values())))
        n = min(self.cfg.val_samples, x0.shape[0])
        if self.vae is None or not n:
            return Validation(metrics)
        noise = get_noise(tuple(x0.shape[1:]), list(range(n)), device=dev)
        z = denoise(module, noise, text[:n], mask[:n], self.empty[0].expand(n, -1, -1),
                    self.empty[1].expand(n, -1), steps=self.cfg.val_steps, cfg=VAL_CFG,
                    sampler="euler", shift=info.shift)
        videos = [to_uint8(v) for v in self.vae.decode(z)]
        captions = list(info.val_captions[:n])
        return Validation(metrics, clips={f"{i:02d}": v for i, v in enumerate(videos)},
                          sheet=contact_sheet(videos, labels=captions), captions=captions)

    def export(self, module: nn.Module, step: int, uri: str) -> str:
        """The package: EMA weights (LoRA merged, or base + lora.safetensors), the run's VAE (an
        imported one as its reference), and render defaults = the geometry trained at, with
        init_from's sampling settings."""
        cfg, info, lcfg = self.cfg, self.info, self.cfg.lora
        dit, lora = export_dit(module.cpu(), merge=lcfg.merge_on_export,
                               scale=lora_scale(lcfg.rank, lcfg.alpha) if lcfg.rank else 1.0)
        lora_meta = ({"rank": lcfg.rank, "alpha": lcfg.alpha or float(lcfg.rank),
                      "target_modules": lcfg.target_modules} if lora else None)
        vae_meta = read_meta(cfg.vae)
        vae = (None if vae_meta.vae_ref else  # imported: keep the reference, load nothing
               load_package(cfg.vae, load_text=False, load_dit=False).vae)
        init = self.init_meta.render if self.init_meta else None
        render = RenderDefaults(frames=info.frames, height=info.height, width=info.width,
                                fps=info.fps, shift=info.shift,
                                buckets=sorted(info.buckets) if len(info.buckets) > 1 else None,
                                steps=init.steps if init else None,
                                cfg=init.cfg if init else None,
                                sampler=init.sampler if init else None)
        run = {"name": cfg.name, "step": step, "stage": self.stage, "data": cfg.data.shards,
               "vae": cfg.vae, "init_from": cfg.init_from, "lora": lcfg.rank or None,
               "lora_merged": bool(lcfg.rank and lora is None)}
        return save_package(uri, vae=vae, vae_ref=vae_meta.vae_ref, vae_config=vae_meta.vae,
                            dit=dit, text=info.text_encoder, render=render, run=run, lora=lora,
                            lora_meta=lora_meta,
                            dit_dtype=torch.bfloat16 if cfg.export_dtype == "bf16" else None)
