"""Validation while training (rank 0, on the EMA weights) and the final package export.

The held-out data are a few samples from the data set's LAST shard, which the driver keeps out
of training. DiT runs log the flow loss at fixed t with fixed noise (comparable across steps)
and write sample videos (mp4 + GIF) to RUN/samples/; VAE runs log reconstruction PSNR and write
original|reconstruction GIFs. Both go to TensorBoard as images.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from t2v import storage
from t2v.config import TrainConfig

VAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    v = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


class Validator:
    def __init__(self, cfg: TrainConfig, data_info: dict, run_uri: str,
                 device: torch.device, rank: int) -> None:
        self.cfg, self.info, self.run_uri, self.device = cfg, data_info, run_uri, device
        self.val = data_info["val"]
        self.vae = None
        if cfg.stage == "dit" and cfg.vae and cfg.val_samples:
            from t2v.models.package import load_package

            self.vae = load_package(cfg.vae, load_text=False, load_dit=False).vae.to(device)

    def _write_clip(self, name: str, frames: np.ndarray, step: int) -> None:
        from t2v.data.video import encode_mp4, to_gif

        base = storage.join(self.run_uri, "samples", f"step_{step:06d}", name)
        storage.write_bytes(base + ".mp4", encode_mp4(frames, fps=8.0))
        storage.write_bytes(base + ".gif", to_gif(frames, fps=8.0))

    @torch.no_grad()
    def run(self, module: nn.Module, step: int) -> dict:
        from t2v.train.monitor import TensorBoard

        metrics = (self._dit(module, step) if self.cfg.stage == "dit"
                   else self._vae(module, step))
        tb = TensorBoard(self.run_uri)
        tb.scalars({f"val/{k}": v for k, v in metrics.items()
                    if isinstance(v, float)}, step)
        sheet = metrics.pop("_sheet", None)
        if sheet is not None:
            from t2v.data.video import to_png

            tb.image("val/samples", sheet, step)
            storage.write_bytes(storage.join(self.run_uri, "samples", f"step_{step:06d}",
                                             "sheet.png"), to_png(sheet))
        tb.close()
        print(f"[val] step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
              flush=True)
        return metrics

    def _dit(self, module: nn.Module, step: int) -> dict:
        from t2v.data.video import contact_sheet
        from t2v.diffusion.flow import heldout_flow_loss
        from t2v.diffusion.sampling import denoise, get_noise

        x0 = torch.from_numpy(self.val["latent"]).float().to(self.device)  # (B, C, T, H, W)
        text = torch.from_numpy(self.val["text"]).float().to(self.device)  # (B, L, D)
        mask = torch.from_numpy(self.val["mask"]).bool().to(self.device)  # (B, L)
        losses = heldout_flow_loss(module, x0, text, mask, t_values=VAL_T, seed=0)
        metrics = {f"flow_loss_t{t:.1f}": float(v) for t, v in losses.items()}
        metrics["flow_loss"] = float(np.mean(list(losses.values())))
        n = min(self.cfg.val_samples, x0.shape[0])
        if self.vae is not None and n:
            e_text, e_mask = (torch.from_numpy(a) for a in self.info["empty_text"])
            neg_t = e_text.float()[None].expand(n, -1, -1).to(self.device)
            neg_m = e_mask.bool()[None].expand(n, -1).to(self.device)
            noise = get_noise(tuple(x0.shape[1:]), list(range(n)), device=self.device)
            z = denoise(module, noise, text[:n], mask[:n], neg_t, neg_m,
                        steps=self.cfg.val_steps, cfg=5.0, sampler="euler")
            videos = [to_uint8(v) for v in self.vae.decode(z)]
            captions = list(self.val["captions"][:n])
            for i, frames in enumerate(videos):
                self._write_clip(f"{i:02d}", frames, step)
            metrics["_sheet"] = contact_sheet(videos, labels=captions)
            storage.write_text(storage.join(self.run_uri, "samples", f"step_{step:06d}",
                                            "captions.json"), json.dumps(captions))
        return metrics

    def _vae(self, module: nn.Module, step: int) -> dict:
        from t2v.data.video import contact_sheet

        clips = torch.from_numpy(self.val["video"]).float().to(self.device)  # (B, T, H, W, 3)
        x = clips.permute(0, 4, 1, 2, 3) / 127.5 - 1.0  # (B, 3, T, H, W)
        recon = module.decode_raw(module.encode(x).mean)
        orig = [to_uint8(v) for v in x]
        rec = [to_uint8(v) for v in recon]
        scores = [psnr(a, b) for a, b in zip(orig, rec, strict=True)]
        n = min(max(self.cfg.val_samples, 1), len(orig))
        pairs = [np.concatenate([a, b], axis=2) for a, b in zip(orig[:n], rec[:n], strict=True)]
        for i, frames in enumerate(pairs):
            self._write_clip(f"{i:02d}_orig_recon", frames, step)
        return {"psnr": float(np.mean(scores)), "_sheet": contact_sheet(pairs)}

    @torch.no_grad()
    def export(self, module: nn.Module, step: int) -> str:
        """Write RUN/package from the EMA weights; returns the package hash.

        A LoRA run writes the adapters merged into dit.safetensors (lora.merge_on_export) or
        the untouched base weights plus lora.safetensors. An imported VAE is exported as its
        reference; render defaults (frames, size, shift) of `init_from` carry over.
        """
        from t2v.models.package import load_package, read_meta, save_package
        from t2v.models.text import TextEncoderConfig

        out = storage.join(self.run_uri, "package")
        run = {"name": self.cfg.name, "step": step, "stage": self.cfg.stage,
               "data": self.cfg.data.shards}
        if self.cfg.stage == "vae":
            from t2v.models.vae import fit_latent_stats

            clips = torch.from_numpy(self.val["stats_video"]).float().to(self.device)
            x = clips.permute(0, 4, 1, 2, 3) / 127.5 - 1.0
            module.set_latent_stats(shift=0.0, scale=1.0)
            shift, scale = fit_latent_stats(module.encode(x).mean)
            module.set_latent_stats(shift=shift, scale=scale)
            h = save_package(out, vae=module.cpu(), run=run)
        else:
            from t2v.models.lora import export_dit, lora_scale

            lcfg = self.cfg.lora
            scale = lora_scale(lcfg.rank, lcfg.alpha) if lcfg.rank else 1.0
            dit, lora = export_dit(module.cpu(), merge=lcfg.merge_on_export, scale=scale)
            lora_meta = ({"rank": lcfg.rank, "alpha": lcfg.alpha or float(lcfg.rank),
                          "target_modules": lcfg.target_modules} if lora else None)
            vae_meta = read_meta(self.cfg.vae)
            vae = (None if vae_meta.vae_ref else  # imported: keep the reference, load nothing
                   load_package(self.cfg.vae, load_text=False, load_dit=False).vae)
            run |= {"vae": self.cfg.vae, "init_from": self.cfg.init_from,
                    "lora": lcfg.rank or None, "lora_merged": bool(lcfg.rank and lora is None)}
            if self.cfg.init_from:
                init = read_meta(self.cfg.init_from).run
                run |= {k: init[k] for k in ("frames", "height", "width", "shift") if k in init}
            text = TextEncoderConfig.from_dict(self.info["text_encoder"])
            h = save_package(out, vae=vae, vae_ref=vae_meta.vae_ref, vae_config=vae_meta.vae,
                             dit=dit, text=text, run=run, lora=lora, lora_meta=lora_meta)
        print(f"[t2v] exported model package {out} (sha256 {h[:12]})", flush=True)
        return h
