"""Distributed training on a real local Ray cluster: 2 CPU workers, DeepSpeed over gloo.

Every run is jobs/configs/debug.yaml (the debug DiT) on `train_latents` (4 training samples = one
global batch), so losses are comparable step by step across ZeRO stages, accumulation,
resumption and a killed worker. The uninterrupted ZeRO-2 reference is the session's `debug_run`,
submitted with `ray job submit` (tests/conftest.py). Each Ray Train run costs ~15 s of start-up on
2 cores: a test starts one only for a property no other run shows.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from t2v import storage
from t2v.config import TrainConfig
from t2v.configfile import load_config
from t2v.train.trainer import run_train
from tests.conftest import DEBUG_CONFIG, RUN_OVERRIDES
from tests.s3_fixtures import copy_tree

STEPS = 4


def config(out: str, name: str, shards: str, vae: str, **over) -> TrainConfig:
    """The reference's config (jobs/configs/debug.yaml + RUN_OVERRIDES) under another name, with
    `over` replacing whole keys (a dotted key, e.g. `**{"data.passes_per_read": 1}`, one
    nested value)."""
    dotted = [f"{k}={v}" for k, v in over.items() if "." in k]
    base = load_config(TrainConfig, DEBUG_CONFIG, [*RUN_OVERRIDES, f"out={out}", f"name={name}",
                                                   f"data.shards={shards}", f"vae={vae}",
                                                   *dotted])
    assert base.steps == STEPS
    plain = {k: v for k, v in over.items() if "." not in k}
    return TrainConfig.model_validate({**base.model_dump(), **plain})


def losses(run_uri: str, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(run_uri, "metrics.jsonl")).splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def assert_same_losses(run_uri: str, reference_uri: str, steps: range,
                       key: str = "loss") -> None:
    got, ref = losses(run_uri, key), losses(reference_uri, key)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (run_uri, step, key)


def final_state(run_uri: str, into) -> tuple[dict, dict]:
    """(fp32 parameters assembled from every rank's checkpoint pieces, EMA of the package) of a
    finished run."""
    from safetensors.torch import load_file

    from t2v.train.checkpoint import read_whole

    names = storage.list_prefix(run_uri)
    final = next(n.rsplit("/", 1)[0] for n in names if n.endswith("/trainer.json")
                 and json.loads(storage.read_text(n))["step"] == STEPS)
    for uri in (n for n in names if n.startswith(final + "/")):
        (into / uri[len(final) + 1:]).parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(uri, into / uri[len(final) + 1:])
    ema = storage.join(run_uri, "package", "dit.safetensors")
    storage.download_file(ema, into / "ema.safetensors")
    return read_whole(into), load_file(str(into / "ema.safetensors"))


def assert_close_states(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-6,
                                   msg=k)


@pytest.fixture(scope="module")
def reference(debug_run):
    """(runs root, run URI) of the uninterrupted ZeRO-2 run every other run is compared with."""
    return debug_run.out, storage.join(debug_run.out, "debug")


def test_reference_run_layout(reference):
    _, run = reference
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
    # Where the steps' time went; the gradient reduction after the backward pass (ZeRO-2's
    # epilogue here) is timed apart from it.
    assert all(r["phase_forward_backward"] > 0 and r["phase_reduce"] > 0 for r in logged)
    assert any("val" in r and "flow_loss" in r["val"] for r in rows)
    # RUN_OVERRIDES' alt_caption_prob=0.5: the synthetic clips' shorter captions (encoded into
    # the latent shards' text_alt) replaced about half the captions (16 samples in all).
    share = sum(r["alt_caption_frac"] for r in logged) / len(logged)
    assert 0.2 < share < 0.8


def test_zero3_sequence_parallel_run_resumes_without_it_on_s3_exactly(
        reference, train_latents, debug_vae_package, moto_s3, s3_bucket, tmp_path):
    """ZeRO-3 (built under zero.Init, sharded EMA, activation checkpointing) with sequence
    parallelism 2: both workers split every sample's tokens, the first reads the data (one
    data-parallel group: micro-batch 1 x accumulation 4 makes the global batch of 4); shards,
    checkpoints and package in S3. Stop at step 2; rerun the same name on 1 worker without
    sequence parallelism: every step's loss is the reference's (ZeRO-2, micro-batch 2, 2
    data-parallel workers, uninterrupted), and so are the final parameters and EMA. So the
    sequence-parallel gradient is the data-parallel one, and its partitioned checkpoint restores
    exactly on another layout, through S3. (2 -> 1 -> 2 workers at ZeRO-0/2/3, bit for bit, and
    accumulation that keeps the global batch: tests/test_train_units.py.)"""
    _, ref = reference
    shards = copy_tree(train_latents, storage.join(s3_bucket, "latents"))
    runs = storage.join(s3_bucket, "runs")
    mirrors = set(Path(tempfile.gettempdir()).glob("t2v-tb-*"))  # rank 0's local TensorBoard
    zero3 = dict(zero_stage=3, batch_size=1, grad_accum=4, activation_checkpointing=True)
    first = run_train(config(runs, "s3run", shards, debug_vae_package, steps=2,
                             sequence_parallel=2, **zero3))
    assert first["step"] == 2
    one = run_train(config(runs, "s3run", shards, debug_vae_package, num_workers=1, **zero3))
    assert one["resumed_from"] == 2 and one["step"] == STEPS
    run = storage.join(runs, "s3run")
    starts = [r for r in map(json.loads, storage.read_text(storage.join(
        run, "metrics.jsonl")).splitlines()) if r.get("event") == "start"]
    assert [(r["step"], r["workers"], r["sequence_parallel"], r["grad_accum"],
             r["global_batch"]) for r in starts] == [(0, 2, 2, 4, 4), (2, 1, 1, 4, 4)]
    assert starts[1]["note"] == "elastic resume, 2 -> 1 workers, data-parallel 1 -> 1"
    assert_same_losses(run, ref, range(1, STEPS + 1))
    # The same alternative captions, counted once per sequence-parallel group.
    assert_same_losses(run, ref, range(1, STEPS + 1), key="alt_caption_frac")
    # AdamW hardly minds a gradient off by a constant factor; the clipped norm does.
    assert_same_losses(run, ref, range(1, STEPS + 1), key="grad_norm")
    params, ema = final_state(run, tmp_path / "z3")
    ref_params, ref_ema = final_state(ref, tmp_path / "ref")
    assert_close_states(params, ref_params)
    assert_close_states(ema, ref_ema)
    assert not all(torch.equal(ema[k], params[k]) for k in ema if k in params)  # EMA != weights
    # TensorBoard's events went to the bucket, and its local mirrors are gone.
    assert any("/tb/events." in n for n in storage.list_prefix(storage.join(run, "tb")))
    assert set(Path(tempfile.gettempdir()).glob("t2v-tb-*")) == mirrors
    # A finished run resubmitted (on 2 workers again) is a no-op that reports the package.
    again = run_train(config(runs, "s3run", shards, debug_vae_package, **zero3))
    assert again["resumed"] and again["step"] == STEPS


def test_zero0_worker_killed_restarts_from_checkpoint(reference, train_latents,
                                                     debug_vae_package, tmp_path):
    """A ZeRO-0 (plain data parallel) run whose worker is SIGKILLed after the step-2 checkpoint:
    Ray Train restarts the group, which resumes from that checkpoint. Steps 1-2 (before the
    kill) match the reference's ZeRO-2 losses, so ZeRO-0 == ZeRO-2; steps 3-4 match too, so the
    restart continued exactly."""
    _, ref = reference
    cfg = config(str(tmp_path), "fault", train_latents, debug_vae_package, zero_stage=0,
                 max_failures=1, val_samples=0, fault={"kill_at_step": 2, "kill_rank": 1})
    result = run_train(cfg)
    run = storage.join(str(tmp_path), "fault")
    injected = json.loads(storage.read_text(storage.join(run, "fault_injected.json")))
    assert injected == {"step": 2, "rank": 1, "pid": injected["pid"]}
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]
    starts = [r["step"] for r in rows if r.get("event") == "start"]
    assert starts == [0, 2]  # a fresh start, then the restart from the step-2 checkpoint
    assert result["step"] == STEPS
    assert_same_losses(run, ref, range(1, 3))  # ZeRO-0 before the kill
    assert_same_losses(run, ref, range(3, STEPS + 1))  # after the restart
    # DeepSpeed reports no gradient norm at ZeRO-0 in fp32 (its clipping drops it): the worker
    # measures it, and it is ZeRO-2's.
    assert_same_losses(run, ref, range(1, STEPS + 1), key="grad_norm")
    assert storage.exists(storage.join(run, "package", "model.json"))


def test_package_from_training_loads_and_samples(debug_run):
    from t2v.diffusion.sampling import denoise, get_noise
    from t2v.models.package import load_package

    pkg = load_package(debug_run.package)
    emb, mask = pkg.text(["a red circle moving left"])
    z = denoise(pkg.dit, get_noise((4, 3, 8, 8), [0]), emb, mask, steps=2, cfg=1.0)
    video = pkg.vae.decode(z)
    assert video.shape == (1, 3, 9, 32, 32) and torch.isfinite(video).all()


def test_buckets_pack_encode_and_train_one_shape_per_batch(ray_local, debug_vae_package,
                                                           tmp_path):
    """Mixed source videos (landscape, portrait, square; short and long) -> `pack --buckets
    debug` -> encode -> DiT training on 2 workers. Each clip lands in the bucket its shape and
    length call for (a clip shorter than every bucket is skipped with why); encode keeps the
    buckets; training batches per bucket: a batch of two shapes cannot even be collated, and the
    per-bucket counts show both training buckets, in whole batches; the package renders at its
    most frequent bucket and lists them all."""
    from t2v.config import EncodeConfig, PackConfig
    from t2v.data.encode import run_encode
    from t2v.data.pack import run_pack
    from t2v.data.shards import iter_shard_samples, read_index
    from t2v.data.synthetic import all_combos, clip_spec, render_clip
    from t2v.data.video import encode_mp4

    src = tmp_path / "src"
    src.mkdir()

    def write(name: str, frames: int, rows: slice, cols: slice, seed: int) -> None:
        spec = clip_spec(seed, seed=3, frames=frames, size=72, allowed=all_combos())
        video = render_clip(spec)[:, rows, cols]
        (src / f"{name}.mp4").write_bytes(encode_mp4(video, fps=8))
        (src / f"{name}.txt").write_text(f"clip {name}\n")

    for i in range(4):  # sorted names: shards [a*], [b*], [c*, d]; the last is held out
        write(f"a_land{i}", 19, slice(12, 60), slice(0, 72), i)  # 48 x 72, 3:2: 17x32x48
        write(f"b_port{i}", 12, slice(0, 72), slice(12, 60), 10 + i)  # 72 x 48: 9x48x32
    for i in range(3):
        write(f"c_square{i}", 20, slice(0, 64), slice(0, 64), 20 + i)  # 64 x 64: 17x48x48
    write("d_short", 5, slice(0, 72), slice(0, 72), 30)
    raw, latents = str(tmp_path / "raw"), str(tmp_path / "latents")
    report = run_pack(PackConfig(src=str(src), out=raw, shard_size=4, buckets="debug"))
    assert (report["packed"], report["skipped"]) == (11, 1)
    assert report["skips"][0]["reason"] == "too short: 5 frames < 9, the shortest bucket's"
    assert {k: v for k, v in report["buckets"].items() if v} == {
        "17x32x48": 4, "9x48x32": 4, "17x48x48": 3}
    for key, f in iter_shard_samples([storage.join(raw, s["name"]) for s in
                                      read_index(raw)["shards"]]):
        meta = json.loads(f["json"])
        assert meta["bucket"] == f"{meta['frames']}x{meta['height']}x{meta['width']}", key
    run_encode(EncodeConfig(src=raw, out=latents, vae=debug_vae_package, batch_size=4))
    index = read_index(latents)
    assert index["buckets"] == {"17x32x48": 4, "17x48x48": 3, "9x48x32": 4}
    assert sorted(map(tuple, index["latent_shapes"])) == [(4, 3, 12, 8), (4, 5, 8, 12),
                                                          (4, 5, 12, 12)]
    cfg = config(str(tmp_path / "runs"), "buckets", latents, debug_vae_package, steps=3,
                 batch_size=2, val_samples=0)
    result = run_train(cfg)
    assert result["step"] == 3
    run = storage.join(str(tmp_path / "runs"), "buckets")
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]
    seen: dict[str, int] = {}
    for r in rows:
        for name, n in r.get("buckets", {}).items():
            seen[name] = seen.get(name, 0) + n
    assert set(seen) == {"17x32x48", "9x48x32"}  # the training shards' buckets, no "other"
    assert all(n % 2 == 0 for n in seen.values()) and sum(seen.values()) == 3 * 2 * 2
    meta = json.loads(storage.read_text(storage.join(run, "package", "model.json")))
    assert meta["render"]["buckets"] == ["17x32x48", "9x48x32"]
    assert (meta["render"]["frames"], meta["render"]["height"], meta["render"]["width"]) == (
        17, 32, 48)  # 4 samples each: the tie goes to the larger bucket


def test_resubmitted_run_resumes_from_a_checkpoint_ray_never_registered(reference,
                                                                          train_latents,
                                                                          debug_vae_package,
                                                                          tmp_path):
    """What a driver killed at the wrong moment leaves: the step-4 checkpoint uploaded by every
    rank but missing from Ray's snapshot (killed before registering it; Ray would resume at
    step 2 and redo 3-4), and a checkpoint cut mid-upload (one rank's state, no trainer.json).
    Resubmitting continues from step 4, says so, logs no step twice, removes the incomplete
    checkpoint at once and the unregistered one once a newer one is registered."""
    import shutil

    from t2v.train.checkpoint import run_checkpoints

    _, ref = reference
    runs = tmp_path / "runs"
    shutil.copytree(ref, runs / "debug")
    for meta in (runs / "debug" / "mlruns").rglob("meta.yaml"):  # MLflow keeps absolute paths
        meta.write_text(meta.read_text().replace(str(ref), str(runs / "debug")))
    mlflow_run = json.loads((runs / "debug" / "tracker.json").read_text())["mlflow"]["run_id"]
    shutil.rmtree(runs / "debug" / "package")  # the kill came before the export
    run = str(runs / "debug")
    found = run_checkpoints(run)
    assert [(c.step, c.registered, c.complete) for c in found] == [(2, True, True),
                                                                   (4, True, True)]
    snap_path = runs / "debug" / "checkpoint_manager_snapshot.json"
    snap = json.loads(snap_path.read_text())
    keep = [r["checkpoint_dir_name"] == found[0].name for r in snap["checkpoint_results"]]
    snap["checkpoint_results"] = [r for r, k in zip(snap["checkpoint_results"], keep,
                                                    strict=True) if k]
    snap["checkpoint_report_indices"] = [i for i, k in zip(snap["checkpoint_report_indices"],
                                                           keep, strict=True) if k]
    snap["latest_checkpoint_result"] = snap["checkpoint_results"][0]
    snap["current_report_index"] = snap["checkpoint_report_indices"][0] + 1
    snap_path.write_text(json.dumps(snap))
    partial = runs / "debug" / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(runs / "debug" / found[1].name / "state", partial / "state")
    (partial / "state" / "rank-00001.safetensors").unlink()
    result = run_train(config(str(runs), "debug", train_latents, debug_vae_package, steps=6,
                              tracker="mlflow"))
    assert result["resumed_from"] == 4 and result["step"] == 6
    rows = [json.loads(x) for x in (runs / "debug" / "metrics.jsonl").read_text().splitlines()]
    # The same MLflow run continues (RUN/tracker.json): steps 1-6 with metrics.jsonl's values,
    # none twice, one run in the experiment, finished.
    from tests.test_tracking import mlflow_client, steps_of

    assert json.loads((runs / "debug" / "tracker.json").read_text())["mlflow"]["run_id"] == \
        mlflow_run
    client = mlflow_client((runs / "debug" / "mlruns").as_uri())
    tracked = client.get_run(mlflow_run)
    assert tracked.info.status == "FINISHED"
    assert len(client.search_runs([tracked.info.experiment_id])) == 1
    history = client.get_metric_history(mlflow_run, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert steps_of(client, mlflow_run, "val/flow_loss")[-1] == 6
    starts = [r["step"] for r in rows if r.get("event") == "start"]
    assert starts == [0, 4]
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # nothing redone, nothing logged twice
    assert_same_losses(run, ref, range(1, STEPS + 1))  # the history is the reference's
    left = run_checkpoints(run)
    assert all(c.registered and c.complete for c in left) and max(c.step for c in left) == 6
    assert not partial.exists() and not (runs / "debug" / found[1].name).exists()


def test_the_dit_driver_takes_the_empty_caption_from_the_latents(train_latents,
                                                                 debug_vae_package, tmp_path,
                                                                 monkeypatch):
    """Describing latent data for a DiT run (the driver's work before Ray Train starts) loads no
    text encoder: the held-out captions' embeddings are in the shards, the empty caption's (what
    a dropped caption gets) beside them (encode writes it). Latents encoded before that file
    existed still train: the driver encodes the empty caption itself, to the same values."""
    import shutil

    import numpy as np

    from t2v.data.latents import EMPTY_CAPTION, read_empty_caption
    from t2v.data.shards import shard_uris
    from t2v.train import dit_task
    from t2v.train.stages import task_for

    def describe(shards: str):  # noqa: ANN202
        cfg = config(str(tmp_path), "describe", shards, debug_vae_package)
        return task_for(cfg).describe_data(shard_uris(shards)[-1], {})

    def refuse(_config) -> None:  # noqa: ANN001
        raise AssertionError("the DiT driver loaded a text encoder")

    with monkeypatch.context() as m:
        m.setattr(dit_task, "shared_text_encoder", refuse)
        info = describe(train_latents)
    text, mask = read_empty_caption(train_latents)
    assert text.shape == (16, 384) and 0 < mask.sum() < 16  # [CLS] [SEP] at text length 16
    assert np.array_equal(info.empty_text, text) and np.array_equal(info.empty_mask, mask)
    old = tmp_path / "old"
    shutil.copytree(train_latents, old)
    index = json.loads((old / "_index.json").read_text())
    del index["empty_caption"]
    (old / "_index.json").write_text(json.dumps(index))
    (old / EMPTY_CAPTION).unlink()
    again = describe(str(old))
    assert np.array_equal(again.empty_text, text) and np.array_equal(again.empty_mask, mask)


def test_a_damaged_header_ends_its_shard_and_the_index_says_so(ray_local, train_latents,
                                                               tmp_path):
    """A tar whose second sample has a damaged header: the reader ends the shard there, with a
    line naming it (t2v/data/tarsource.py), and keeps only the samples it knows are whole (the
    first sample's members may go on past the bad header). The index still lists every sample,
    and that is what each pass is checked against (t2v/train/monitor.py pass_done)."""
    import shutil
    import tarfile

    from t2v.data.latents import latent_stream
    from t2v.data.shards import index_samples, indexed_shards, shard_uris

    data = tmp_path / "latents"
    shutil.copytree(train_latents, data)
    uris = shard_uris(str(data))[:-1]  # the training shards
    with tarfile.open(uris[0]) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    with open(uris[0], "r+b") as f:
        f.seek(second.offset)
        f.write(b"\x07" * 512)  # the header of the second sample's first member
    rows = latent_stream(uris).count()
    assert index_samples(indexed_shards(str(data), uris)) == 4 and rows == 2
