"""Distributed training on a real local Ray cluster: 2 CPU workers, DeepSpeed over gloo.

Every run uses the debug DiT on `train_latents` (4 training samples = one global batch), so
losses are comparable step by step across ZeRO stages, accumulation and resumption.
"""

from __future__ import annotations

import json

import pytest
import torch

from t2v import storage
from t2v.config import TrainConfig
from t2v.models.package import read_meta
from t2v.train.trainer import run_train

STEPS = 4


def config(out: str, name: str, shards: str, vae: str, **over) -> TrainConfig:
    base = dict(stage="dit", name=name, out=out, model="debug", vae=vae, steps=STEPS,
                batch_size=2, grad_accum=1, num_workers=2, cpus_per_worker=0.5,
                zero_stage=2, log_every=1, ckpt_every=2, val_every=STEPS, val_samples=1,
                val_steps=2, max_failures=0, placement_strategy="SPREAD", caption_dropout=0.25,
                optim={"lr": 1e-3, "warmup_steps": 1})
    base["data"] = {"shards": shards}
    for k, v in over.items():
        base[k] = v
    return TrainConfig.model_validate(base)


def losses(run_uri: str) -> dict[int, float]:
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(run_uri, "metrics.jsonl")).splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(ray_local, train_latents, debug_vae_package, tmp_path_factory):
    """ZeRO-2, 4 steps, uninterrupted: the run every other test compares against."""
    out = str(tmp_path_factory.mktemp("runs"))
    result = run_train(config(out, "ref", train_latents, debug_vae_package))
    return out, result


def test_reference_run_layout(reference):
    out, result = reference
    run = storage.join(out, "ref")
    assert result["step"] == STEPS
    names = storage.list_prefix(run)
    assert any("/checkpoint_" in n and n.endswith("trainer.json") for n in names)
    assert storage.exists(storage.join(run, "config.yaml"))
    assert any("/tb/" in n for n in names)
    assert any(n.endswith(".mp4") for n in names if "/samples/" in n)
    assert any(n.endswith("sheet.png") for n in names)
    pkg = storage.join(run, "package")
    meta = json.loads(storage.read_text(storage.join(pkg, "model.json")))
    assert meta["run"]["step"] == STEPS and meta["dit"]["in_channels"] == 4
    # Render defaults: the geometry of the latents it trained on, the data's fps, its shift.
    assert meta["render"] == {"frames": 9, "height": 32, "width": 32, "fps": 8.0, "shift": 1.0,
                              "steps": None, "cfg": None, "sampler": None}
    # keep_checkpoints=2 of the checkpoints at steps 2 and 4
    ckpts = {n.split("/checkpoint_")[1].split("/")[0] for n in names
             if "/checkpoint_" in n and not n.endswith("manager_snapshot.json")}
    assert len(ckpts) == 2
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for key in ("grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_wait_frac", "mfu",
                "eta_s"):
        assert key in logged[-1]
    assert any("val" in r and "flow_loss" in r["val"] for r in rows)


@pytest.mark.parametrize("stage,micro,accum", [(0, 2, 1), (3, 1, 2)])
def test_zero_stages_and_accumulation_match(reference, train_latents, debug_vae_package,
                                            tmp_path, stage, micro, accum):
    """ZeRO-0 and ZeRO-3 (the latter with micro-batch 1 x accumulation 2) give the reference's
    ZeRO-2 micro-batch-2 losses: one Ray Train run per case, each ~20 s of start-up."""
    out, _ = reference
    run_train(config(str(tmp_path), f"zero{stage}", train_latents, debug_vae_package,
                     zero_stage=stage, batch_size=micro, grad_accum=accum, steps=3,
                     val_samples=0))
    ref = losses(storage.join(out, "ref"))
    got = losses(storage.join(str(tmp_path), f"zero{stage}"))
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (stage, accum, step)


def test_resume_on_s3_continues_exactly(reference, train_latents, debug_vae_package, moto_s3,
                                        s3_bucket):
    """Shards, checkpoints and package in S3; stop at step 2, resubmit, match the reference."""
    out, _ = reference
    shards = storage.join(s3_bucket, "latents")
    for uri in storage.list_prefix(train_latents):
        storage.write_bytes(storage.join(shards, uri[len(train_latents) + 1:]),
                            storage.read_bytes(uri))
    runs = storage.join(s3_bucket, "runs")
    first = run_train(config(runs, "s3run", shards, debug_vae_package, steps=2))
    assert first["step"] == 2
    second = run_train(config(runs, "s3run", shards, debug_vae_package))
    assert second["resumed_from"] == 2 and second["step"] == STEPS
    got, ref = losses(storage.join(runs, "s3run")), losses(storage.join(out, "ref"))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert storage.exists(storage.join(runs, "s3run", "package", "dit.safetensors"))
    # A finished run resubmitted is a no-op that reports the package.
    again = run_train(config(runs, "s3run", shards, debug_vae_package))
    assert again["resumed"] and again["step"] == STEPS


def test_killed_worker_restarts_from_checkpoint(train_latents, debug_vae_package, tmp_path):
    cfg = config(str(tmp_path), "fault", train_latents, debug_vae_package, max_failures=1,
                 val_samples=0, fault={"kill_at_step": 2, "kill_rank": 1})
    result = run_train(cfg)
    run = storage.join(str(tmp_path), "fault")
    injected = json.loads(storage.read_text(storage.join(run, "fault_injected.json")))
    assert injected == {"step": 2, "rank": 1, "pid": injected["pid"]}
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]
    starts = [r["step"] for r in rows if r.get("event") == "start"]
    assert starts == [0, 2]  # a fresh start, then the restart from the step-2 checkpoint
    assert result["step"] == STEPS
    assert storage.exists(storage.join(run, "package", "model.json"))


def test_package_from_training_loads_and_samples(reference):
    from t2v.diffusion.sampling import denoise, get_noise
    from t2v.models.package import load_package

    out, _ = reference
    pkg = load_package(storage.join(out, "ref", "package"))
    emb, mask = pkg.text(["a red circle moving left"])
    z = denoise(pkg.dit, get_noise((4, 3, 8, 8), [0]), emb, mask, steps=2, cfg=1.0)
    video = pkg.vae.decode(z)
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()


def test_vae_stage_then_dit_encoding_on_the_fly(ray_local, train_raw, tmp_path):
    """stage vae on raw shards -> VAE-only package with fitted latent stats; then a DiT run
    that reads the RAW shards and encodes each batch in the worker with that VAE."""
    from t2v.configfile import load_config

    out = str(tmp_path)
    vae_cfg = load_config(TrainConfig, "jobs/configs/debug-vae.yaml",
                          [f"out={out}", f"data.shards={train_raw}", "batch_size=2",
                           "cpus_per_worker=0.5", "val_samples=1"])
    result = run_train(vae_cfg)
    pkg = storage.join(out, "debug-vae", "package")
    meta = json.loads(storage.read_text(storage.join(pkg, "model.json")))
    assert result["step"] == 4 and meta["dit"] is None and meta["run"]["stage"] == "vae"
    assert meta["vae"]["shift"] != 0.0 and meta["vae"]["scale"] != 1.0  # fitted, per channel
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(out, "debug-vae", "metrics.jsonl")).splitlines()]
    assert any("psnr" in r.get("val", {}) for r in rows)

    dit = config(out, "fly", train_raw, pkg, steps=2, val_samples=1, shift=3.0,
                 data={"shards": train_raw, "encode_on_the_fly": True, "text_max_length": 16,
                       "frames": 5, "size": 16})
    assert run_train(dit)["step"] == 2
    got = losses(storage.join(out, "fly"))
    assert all(v == v and v > 0 for v in got.values())  # finite, positive
    assert storage.exists(storage.join(out, "fly", "package", "dit.safetensors"))
    # Trained on 5x16x16 clips: that is what its package renders by default (not 9x32x32).
    render = read_meta(storage.join(out, "fly", "package")).render
    assert (render.frames, render.height, render.width, render.shift) == (5, 16, 16, 3.0)
