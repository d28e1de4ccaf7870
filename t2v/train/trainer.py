"""`t2v train`: the driver of a Ray Train run (TorchTrainer + DeepSpeed workers).

Run directory (DESIGN.md "Contracts"): RUNS/NAME/checkpoint_* (Ray's), config.yaml (resolved),
tb/, samples/, and package/ at the end; tracker.json (and mlruns/, MLflow's default store) with a
`tracker` (t2v/train/tracking.py). Submitting the same name again resumes the run from its latest
checkpoint (Ray Train restores its checkpoint manager from RUNS/NAME), and its tracked run.

Data order on resume: a checkpoint records the pass over the data and how many micro-batches of
it the workers had taken (trainer.json `data`). Pass p reads the shards in an order drawn from
(data.shuffle_seed, p) (t2v/data/tarsource.py: the workers tell the reader the pass through a
`PassClock` actor), Ray Data keeps block order (`data.ordered`, preserve_order), and the local
shuffle is seeded by (seed, p); so a restarted worker group or a resubmitted run re-reads its pass,
skips what it had consumed, and trains on exactly the batches an uninterrupted run would. The
model, optimizer, LR schedule, EMA and step counter resume exactly as well.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time

import ray
from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from t2v import arrowfs, storage
from t2v.config import TrainConfig
from t2v.configfile import save_resolved
from t2v.data.shards import bucket_counts, index_samples, indexed_shards, shard_uris
from t2v.data.tarsource import PassClock
from t2v.runtime import check_output_uri, ensure_ray
from t2v.train import checkpoint
from t2v.train.memory import dry_run
from t2v.train.parallel import GroupedData
from t2v.train.stages import task_for
from t2v.train.tracking import check_tracker
from t2v.train.worker import train_loop_per_worker


def remove_dir(uri: str) -> None:
    """Every object under `uri`, and a local directory itself."""
    for f in storage.list_prefix(uri):
        storage.delete(f)
    if not storage.is_s3(uri):
        shutil.rmtree(storage.local_path(uri), ignore_errors=True)


def resume_point(run_uri: str) -> tuple[int, str | None]:
    """(the step a resubmitted run resumes at, the checkpoint URI workers must read when Ray
    would pick an older one). Removes what a killed driver left half written.

    The newest complete checkpoint wins: Ray restores the newest one in its snapshot, which
    misses a checkpoint whose upload finished after the driver died. Incomplete ones (a rank's
    state or trainer.json missing: the kill came mid-upload) are deleted, so nothing can try
    to load them."""
    found = checkpoint.run_checkpoints(run_uri)
    for c in found:
        if not c.complete and not c.registered:
            remove_dir(c.uri)
            print(f"[t2v] removed incomplete checkpoint {c.name} ({c.ranks} of "
                  f"{c.world or '?'} ranks' state, trainer.json "
                  f"{'present' if c.step is not None else 'missing'})", flush=True)
    complete = [c for c in found if c.complete]
    if not complete:
        return 0, None
    newest, known = complete[-1], [c for c in complete if c.registered]
    if known and known[-1].step >= newest.step:
        return newest.step, None
    print(f"[t2v] {newest.name} (step {newest.step}) is complete but unknown to Ray Train "
          f"(its driver stopped before registering it; Ray's newest is step "
          f"{known[-1].step if known else 'none'}): resuming from it", flush=True)
    return newest.step, newest.uri


def remove_superseded(run_uri: str) -> None:
    """After a run: checkpoints Ray never registered, older than its newest, go (Ray's
    keep_checkpoints only prunes the ones it knows)."""
    found = checkpoint.run_checkpoints(run_uri)
    newest = max((c.step for c in found if c.registered and c.step is not None), default=None)
    for c in found:
        if not c.registered and newest is not None and (c.step or 0) < newest:
            remove_dir(c.uri)
            print(f"[t2v] removed {c.name}: superseded, not registered by Ray", flush=True)


def split_held_out(uris: list[str]) -> tuple[list[str], str | None]:
    """Keep the last shard out of training when there is more than one."""
    if len(uris) > 1:
        return uris[:-1], uris[-1]
    return uris, None


def ingest_options(ordered: bool):  # noqa: ANN201 - ray.data.ExecutionOptions
    """Ray Train's ingest options, with blocks kept in order when `ordered`: Ray's split then
    gives each worker the blocks it gave it before (it deals a block to the worker that has
    received the fewest rows, and ignores locality hints when order is kept)."""
    # The current context's options, as Ray Train's default takes them, copied rather than
    # rebuilt field by field (its rebuild sets a deprecated field and warns on every run).
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = ordered
    return options


STEPS_PER_READ = 200
"""What `data.passes_per_read` None aims at: one Ray Data execution per this many steps."""


def passes_per_read(cfg: TrainConfig, train_samples: int | None) -> int:
    """`data.passes_per_read`, or enough passes for STEPS_PER_READ steps an execution (the
    index's sample count and the smallest global batch; 1 without an index), at most 64."""
    if cfg.data.passes_per_read:
        return cfg.data.passes_per_read
    if not train_samples:
        return 1
    batch = cfg.batch_size * cfg.grad_accum * max(1, cfg.min_workers // cfg.sequence_parallel)
    return min(64, max(1, math.ceil(STEPS_PER_READ / max(1, train_samples // batch))))


def run_train(cfg: TrainConfig) -> dict:
    check_output_uri(cfg.out)
    cfg = check_tracker(cfg, storage.join(cfg.out, cfg.name))  # installed; MLflow's store
    if not cfg.data.shards:
        raise ValueError("train: data.shards is required")
    task = task_for(cfg)
    task.check()
    if cfg.dry_run:
        return dry_run(cfg)
    # What can be checked without Ray is checked before it starts and before anything is written.
    uris = shard_uris(cfg.data.shards)
    if not uris:
        raise storage.StorageError(f"{cfg.data.shards}: no shard-*.tar found")
    ensure_ray(cfg.ray_address)
    t0 = time.time()
    run_uri = storage.join(cfg.out, cfg.name)
    resume_step, resume_from = resume_point(run_uri)
    if resume_step >= cfg.steps and storage.exists(storage.join(run_uri, "package",
                                                                "model.json")):
        # Before reading any data: resubmitting a finished run costs nothing.
        print(f"[t2v] run {run_uri} already finished at step {resume_step}", flush=True)
        return {"run": run_uri, "step": resume_step, "package": storage.join(run_uri, "package"),
                "resumed": True}
    save_resolved(cfg, storage.join(run_uri, "config.yaml"))
    train, val_uri = split_held_out(uris)
    indexed = indexed_shards(cfg.data.shards, train)
    buckets = bucket_counts(indexed)
    column = task.bucket_column(buckets)  # refuses what this stage cannot batch
    info = task.describe_data(val_uri or uris[-1], buckets)
    info.train_samples = index_samples(indexed)
    # The workers say which pass the stream reads (module doc); it reads this many in a row.
    clock = PassClock.remote(passes_per_read(cfg, info.train_samples))
    dataset, collate = task.dataset(train, clock)
    ingest = ingest_options(cfg.data.ordered)
    fs, storage_path = arrowfs.pyarrow_filesystem(cfg.out)
    resources = {"CPU": cfg.cpus_per_worker}
    sp = cfg.sequence_parallel
    # One sequence-parallel group is one node; more groups: PACK fills nodes in rank order and
    # the workers check that no group spans two (t2v/train/parallel.py).
    placement = ("STRICT_PACK" if sp > 1 and sp == cfg.num_workers
                 and cfg.placement_strategy == "PACK" else cfg.placement_strategy)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(), "data_info": info, "run_uri": run_uri,
                           "collate": collate, "bucket_column": column,
                           "resume_from": resume_from, "clock": clock},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=placement),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset},
        # sequence parallelism: one stream split per group, read by its first rank
        dataset_config=(GroupedData(sp, execution_options=ingest) if sp > 1
                        else DataConfig(execution_options=ingest)),
    )
    print(f"[t2v] training {cfg.stage} '{cfg.name}' -> {run_uri} ({len(train)} train shards, "
          f"held-out {val_uri}, clips {info.frames}x{info.height}x{info.width}"
          f"{f', sequence parallel {sp}' if sp > 1 else ''}, resume from step {resume_step})",
          flush=True)
    if column:
        print(f"[t2v] batches per bucket, training samples: "
              f"{', '.join(f'{k} {v}' for k, v in buckets.items())}", flush=True)
    # Ray Train hands this to its controller (and the workers) when fit() starts it.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.poll_s)
    try:
        result = trainer.fit()
    finally:
        ray.kill(clock)  # the run's own actor; a driver that trains again makes another
    assert ray.is_initialized()
    remove_superseded(run_uri)
    if result.error is not None:
        raise RuntimeError(f"training run {run_uri} failed: {result.error}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    return {"run": run_uri, "step": metrics.get("step"), "loss": metrics.get("loss"),
            "package": storage.join(run_uri, "package"), "resumed_from": resume_step,
            "seconds": round(time.time() - t0, 1)}
