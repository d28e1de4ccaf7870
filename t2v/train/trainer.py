"""`t2v train`: the driver of a Ray Train run (TorchTrainer + DeepSpeed workers).

Run directory (DESIGN.md "Contracts"): RUNS/NAME/checkpoint_* (Ray's), config.yaml (resolved),
tb/, samples/, and package/ at the end. Submitting the same name again resumes the run from its
latest checkpoint (Ray Train restores its checkpoint manager from RUNS/NAME).

Data order on resume: Ray Data has no iterator checkpoint, so the shard-file order of each pass is
drawn from a seed derived from (data.shuffle_seed, the step the run resumes at); the model,
optimizer, LR schedule, EMA and step counter resume exactly. Within one submission, a restarted
worker group (FailureConfig) keeps the same dataset and its next pass reshuffles.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from t2v import storage
from t2v.config import TrainConfig, save_resolved
from t2v.data.shards import iter_shard_samples, read_index, shard_uris

VAL_COUNT = 8  # held-out samples for validation (and VAE latent statistics: up to 32)


def latest_checkpoint_step(run_uri: str) -> int:
    steps = [0]
    for uri in storage.list_prefix(run_uri, suffix="trainer.json"):
        if "/checkpoint_" in uri:
            steps.append(int(json.loads(storage.read_text(uri))["step"]))
    return max(steps)


def split_held_out(uris: list[str]) -> tuple[list[str], str | None]:
    """Keep the last shard out of training when there is more than one."""
    if len(uris) > 1:
        return uris[:-1], uris[-1]
    return uris, None


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _encode_val_on_the_fly(cfg: TrainConfig, val_uri: str, text_cfg) -> list[dict]:
    """Held-out rows in latent-shard form, encoded here from a raw shard."""
    import torch

    from t2v.data.video import VideoDecodeError, decode_video
    from t2v.models.package import load_package
    from t2v.models.text import TextEncoder

    size = (cfg.data.size, cfg.data.size) if cfg.data.size else None
    clips, captions = [], []
    for _key, fields in iter_shard_samples([val_uri]):
        try:
            clip = decode_video(fields["mp4"], num_frames=cfg.data.frames, size=size)
        except VideoDecodeError:
            continue
        if clip.shape[0] == cfg.data.frames:
            clips.append(clip)
            captions.append(fields["txt"].decode())
        if len(clips) == VAL_COUNT:
            break
    vae = load_package(cfg.vae, load_text=False, load_dit=False).vae
    with torch.no_grad():
        x = torch.from_numpy(np.stack(clips)).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0
        latent = vae.encode_latents(x).numpy()
    emb, mask = TextEncoder(text_cfg)(captions)
    return [{"latent": latent[i], "text": emb[i].numpy(), "mask": mask[i].numpy(),
             "txt": captions[i]} for i in range(len(latent))]


def dit_data(cfg: TrainConfig, train: list[str], val_uri: str) -> dict:
    from t2v.models.text import TextEncoder, TextEncoderConfig

    if cfg.data.encode_on_the_fly:
        text_cfg = TextEncoderConfig(ref=cfg.data.text_encoder, max_length=cfg.data.text_max_length)
        rows = _encode_val_on_the_fly(cfg, val_uri, text_cfg)
        index = {}
    else:
        index = read_index(cfg.data.shards)
        text_cfg = TextEncoderConfig.from_dict(index["text_encoder"])
        rows = []
        for _key, fields in iter_shard_samples([val_uri]):
            rows.append({"latent": _npy(fields["latent.npy"]), "text": _npy(fields["text.npy"]),
                         "mask": _npy(fields["mask.npy"]), "txt": fields["txt"].decode()})
            if len(rows) == VAL_COUNT:
                break
    latent = np.stack([r["latent"].astype(np.float32) for r in rows])
    empty, empty_mask = TextEncoder(text_cfg)([""])
    c, t, h, w = latent.shape[1:]
    import torch

    from t2v.models.dit import VideoDiT
    from t2v.train.worker import dit_geometry

    with torch.device("meta"):
        probe = VideoDiT(dit_geometry(cfg, c, int(empty.shape[-1])))
    if cfg.lora.rank:  # a bad target name fails here, once, not in every worker
        from t2v.models.lora import target_layers

        target_layers(probe, cfg.lora.target_modules)
    flops = probe.flops((1, c, t, h, w), text_cfg.max_length)
    return {
        "latent_channels": c, "text_dim": int(empty.shape[-1]),
        "text_encoder": text_cfg.to_dict(), "latent_shape": [c, t, h, w],
        "tokens_per_sample": int(np.prod(probe.grid((1, c, t, h, w)))),
        "train_flops_per_sample": 3 * flops,
        "empty_text": (empty[0].numpy().astype(np.float16), empty_mask[0].numpy().astype(
            np.uint8)),
        "val": {"latent": latent,
                "text": np.stack([r["text"].astype(np.float32) for r in rows]),
                "mask": np.stack([r["mask"].astype(np.uint8) for r in rows]),
                "captions": [r["txt"] for r in rows]},
        "vae_index": index.get("vae"),
        "num_train_shards": len(train),
    }


def vae_data(cfg: TrainConfig, train: list[str], val_uri: str) -> dict:
    from t2v.data.video import decode_video

    clips = []
    for _key, fields in iter_shard_samples([val_uri]):
        try:
            size = (cfg.data.size, cfg.data.size) if cfg.data.size else None
            clip = decode_video(fields["mp4"], num_frames=cfg.data.frames, size=size)
        except ValueError:
            continue
        if clip.shape[0] == cfg.data.frames:
            clips.append(clip)
        if len(clips) == 32:
            break
    video = np.stack(clips)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from t2v.models.vae import CausalVideoVAE, vae_config

    with torch.device("meta"):  # counts FLOPs without computing anything
        probe = CausalVideoVAE(vae_config(cfg.model, **cfg.model_overrides))
        x = torch.zeros(1, 3, *video.shape[1:4])
        with FlopCounterMode(display=False) as counter:
            probe(x, sample_posterior=False)
    return {"val": {"video": video[:VAL_COUNT], "stats_video": video},
            "tokens_per_sample": int(np.prod(video.shape[1:4])),
            "train_flops_per_sample": 3 * counter.get_total_flops(),
            "num_train_shards": len(train)}


def build_dataset(cfg: TrainConfig, train: list[str], resume_step: int):
    import ray

    seed = cfg.data.shuffle_seed * 1_000_003 + resume_step
    if cfg.stage == "vae" or cfg.data.encode_on_the_fly:
        from t2v.config import ReaderConfig
        from t2v.data.streaming import VideoCollate, video_stream

        reader = ReaderConfig(shards=cfg.data.shards, frames=cfg.data.frames, size=cfg.data.size,
                              shuffle_seed=seed)
        return video_stream(reader, uris=train).dataset, VideoCollate()
    from t2v.data.latents import LatentCollate, latent_stream

    ds = latent_stream(train, shuffle_seed=seed)
    assert isinstance(ds, ray.data.Dataset)
    return ds, LatentCollate()


def run_train(cfg: TrainConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from t2v.runtime import check_output_uri, ensure_ray
    from t2v.train.worker import train_loop_per_worker

    check_output_uri(cfg.out)
    if not cfg.data.shards:
        raise ValueError("train: data.shards is required")
    if cfg.stage == "dit" and not cfg.vae:
        raise ValueError("train: stage dit needs vae=PACKAGE (the VAE the latents were made with)")
    from t2v.train.worker import check_lora

    check_lora(cfg)
    ensure_ray(cfg.ray_address)
    t0 = time.time()
    run_uri = storage.join(cfg.out, cfg.name)
    save_resolved(cfg, storage.join(run_uri, "config.yaml"))
    uris = shard_uris(cfg.data.shards)
    if not uris:
        raise storage.StorageError(f"{cfg.data.shards}: no shard-*.tar found")
    train, val_uri = split_held_out(uris)
    info = (dit_data if cfg.stage == "dit" else vae_data)(cfg, train, val_uri or uris[-1])
    resume_step = latest_checkpoint_step(run_uri)
    if resume_step >= cfg.steps and storage.exists(storage.join(run_uri, "package",
                                                                "model.json")):
        print(f"[t2v] run {run_uri} already finished at step {resume_step}", flush=True)
        return {"run": run_uri, "step": resume_step, "package": storage.join(run_uri, "package"),
                "resumed": True}
    dataset, collate = build_dataset(cfg, train, resume_step)
    fs, storage_path = storage.pyarrow_filesystem(cfg.out)
    resources = {"CPU": cfg.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "data_info": info, "run_uri": run_uri,
                           "collate": collate},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset},
    )
    print(f"[t2v] training {cfg.stage} '{cfg.name}' -> {run_uri} ({len(train)} train shards, "
          f"held-out {val_uri}, resume from step {resume_step})", flush=True)
    result = trainer.fit()
    assert ray.is_initialized()
    if result.error is not None:
        raise RuntimeError(f"training run {run_uri} failed: {result.error}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return {"run": run_uri, "step": metrics.get("step"), "loss": metrics.get("loss"),
            "package": storage.join(run_uri, "package"), "resumed_from": resume_step,
            "seconds": round(time.time() - t0, 1)}
