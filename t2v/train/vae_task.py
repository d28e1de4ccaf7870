"""Stage `vae`: the causal video VAE on raw shards (decoded clips), exported as a VAE-only
package with per-channel latent shift/scale fitted on held-out clips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from t2v.config import ReaderConfig
from t2v.data.collate import VideoBatch, VideoCollate
from t2v.data.streaming import video_stream
from t2v.data.tensors import to_model_range, to_uint8
from t2v.data.video import contact_sheet
from t2v.models.dit import Whole
from t2v.models.latent import fit_latent_stats
from t2v.models.package import load_package, save_package
from t2v.models.vae import CausalVideoVAE, vae_config
from t2v.train.schedule import per_sample_generators, sample_seed, train_flops
from t2v.train.task import (
    VAL_COUNT,
    DataInfo,
    StageTask,
    Validation,
    clip_fps,
    load_weights,
    read_clips,
)
from t2v.train.validation import psnr

STATS_COUNT = 32
"""Held-out clips the latent shift/scale are fitted on."""


@dataclass
class VAEData(DataInfo):
    video: np.ndarray
    """Held-out clips uint8 (N, T, H, W, 3): the first VAL_COUNT validate, all fit the stats."""


def crop_windows(x: Tensor, frames: int, side: int,
                 generators: list[torch.Generator]) -> Tensor:
    """(B, C, T, H, W) -> (B, C, frames, side, side): clip i's window starts where its own
    generator draws (uniform over the positions that fit)."""
    b, _, t, h, w = x.shape
    if len(generators) != b or frames > t or side > min(h, w):
        raise ValueError(f"cannot cut {b} windows of {frames}x{side}x{side} from "
                         f"{tuple(x.shape)} with {len(generators)} generators")
    out = []
    for clip, g in zip(x, generators, strict=True):
        t0, y0, x0 = (int(torch.randint(n + 1, (), generator=g))
                      for n in (t - frames, h - side, w - side))
        out.append(clip[:, t0:t0 + frames, y0:y0 + side, x0:x0 + side])
    return torch.stack(out)


class VAETask(StageTask):
    stage = "vae"

    info: VAEData

    def check(self) -> None:
        super().check()
        if self.cfg.data.crop is None:
            return
        (frames, side), vae = self.cfg.data.crop, vae_config(self.cfg.model,
                                                             **self.cfg.model_overrides)
        td, sd = vae.temporal_down, vae.spatial_down
        if (frames - 1) % td or side % sd:
            near = [(frames - 1) // td * td + 1, max(side // sd, 1) * sd]
            raise ValueError(f"data.crop={self.cfg.data.crop}: the VAE needs 1 + k x {td} "
                             f"frames and a multiple of {sd} pixels (e.g. {near})")

    def describe_data(self, val_uri: str, buckets: dict[str, int]) -> VAEData:
        cfg = self.cfg
        clips = read_clips(val_uri, cfg.data.frames, cfg.data.size, STATS_COUNT)
        video = np.stack([c.frames for c in clips])  # (N, T, H, W, 3) uint8
        t, h, w = video.shape[1:4]
        seen = (t, h, w)  # what one training sample is: the clip, or its window
        if cfg.data.crop is not None:
            frames, side = cfg.data.crop
            if frames > t or side > min(h, w):
                raise ValueError(f"data.crop={cfg.data.crop}: a window of {frames}x{side}x{side}"
                                 f" does not fit the {t}x{h}x{w} clips of {val_uri}")
            seen = (frames, side, side)
        with torch.device("meta"):  # counts FLOPs without computing anything
            probe = CausalVideoVAE(vae_config(cfg.model, **cfg.model_overrides))
            with FlopCounterMode(display=False) as counter:
                probe(torch.zeros(1, 3, *seen), sample_posterior=False)
        return VAEData(frames=t, height=h, width=w,
                       fps=clip_fps([c.meta for c in clips]),
                       tokens_per_sample=int(np.prod(seen)),
                       train_flops_per_sample=train_flops(counter.get_total_flops()), video=video,
                       buckets=buckets)

    def dataset(self, train: list[str], clock):  # noqa: ANN001, ANN201
        reader = ReaderConfig(shards=self.cfg.data.shards, frames=self.cfg.data.frames,
                              size=self.cfg.data.size, shuffle_seed=self.cfg.data.shuffle_seed)
        return video_stream(reader, uris=train, clock=clock).dataset, VideoCollate()

    def build_model(self, info: DataInfo, whole: Whole | None = None) -> nn.Module:
        cfg = self.cfg
        model = CausalVideoVAE(vae_config(cfg.model, **cfg.model_overrides))
        if cfg.init_from:
            pkg = load_package(cfg.init_from, load_text=False, load_dit=False)
            if pkg.vae is None or not isinstance(pkg.vae, CausalVideoVAE):
                raise ValueError(f"init_from={cfg.init_from}: the package has no VAE of ours")
            load_weights(model, pkg.vae.state_dict(), whole)
        return model

    def loss(self, engine: nn.Module, batch: VideoBatch, step: int) -> Tensor:
        x = batch.video  # (B, 3, T, H, W) on the CPU
        if self.cfg.data.crop is not None:  # each clip's window from (seed, step, its key)
            gens = per_sample_generators(self.cfg.seed, step, batch.keys, "vae-crop")
            x = crop_windows(x, *self.cfg.data.crop, gens)  # (B, 3, frames, side, side)
        x = x.to(self.device, self.dtype)  # only the windows travel to the device
        # The posterior's noise from (seed, step, the batch's samples), not from the process's
        # RNG: a resumed run draws what an uninterrupted one would.
        seed = sample_seed(self.cfg.seed, step, ",".join(batch.keys), "vae-posterior")
        generator = torch.Generator(self.device).manual_seed(seed)
        recon, posterior = engine(x, generator=generator)
        return engine.module.loss(x, recon, posterior, kl_weight=self.cfg.kl_weight,
                                  l1_weight=self.cfg.l1_weight, mse_weight=self.cfg.mse_weight,
                                  edge_weight=self.cfg.edge_weight,
                                  scale_weight=self.cfg.scale_weight)["total"]

    def _held_out(self, count: int | None = None) -> torch.Tensor:
        """The first `count` (default all) held-out clips on the device, model range."""
        return to_model_range(self.info.video[:count]).to(self.device)  # (N, 3, T, H, W)

    def validate(self, module: nn.Module, step: int) -> Validation:
        x = self._held_out(VAL_COUNT)  # converts only what validation uses
        recon = module.decode_raw(module.encode(x).mean)
        orig, rec = [to_uint8(v) for v in x], [to_uint8(v) for v in recon]
        scores = [psnr(a, b) for a, b in zip(orig, rec, strict=True)]
        n = min(max(self.cfg.val_samples, 1), len(orig))
        pairs = [np.concatenate([a, b], axis=2) for a, b in zip(orig[:n], rec[:n], strict=True)]
        return Validation(metrics={"psnr": float(np.mean(scores))},
                          clips={f"{i:02d}_orig_recon": p for i, p in enumerate(pairs)},
                          sheet=contact_sheet(pairs))

    def export(self, module: nn.Module, step: int, uri: str) -> str:
        """A VAE-only package; the latent shift/scale are fitted on the held-out clips."""
        module.set_latent_stats(shift=0.0, scale=1.0)
        shift, scale = fit_latent_stats(module.encode(self._held_out()).mean)
        module.set_latent_stats(shift=shift, scale=scale)
        run = {"name": self.cfg.name, "step": step, "stage": self.stage,
               "data": self.cfg.data.shards}
        return save_package(uri, vae=module.cpu(), run=run)
