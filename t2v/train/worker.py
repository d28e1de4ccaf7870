"""The Ray Train worker loop: DeepSpeed ZeRO around a pure-torch model (thin orchestration).

One function, `train_loop_per_worker`, runs on every worker, for every stage: the stage's task
(t2v/train/task.py) builds the model, turns a micro-batch into a loss, validates and exports; the
loop owns the engine, EMA, checkpoints, metrics and the step count. The model files never mention
distribution: DeepSpeed wraps the model here, from outside.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path

import ray
import ray.train
import torch

from t2v import storage
from t2v.config import TrainConfig
from t2v.console import say
from t2v.data.buckets import batches_by_shape
from t2v.train import checkpoint, parallel, zero
from t2v.train.monitor import Monitor
from t2v.train.schedule import EMA, adamw, lr_factor
from t2v.train.stages import task_for
from t2v.train.validation import record_validation

# ----------------------------------------------------------------------------- engine


ZERO_BUCKETS = {
    # DeepSpeed's defaults (5e8-element buckets, 1e9 live ZeRO-3 parameters) are sized for
    # models of tens of billions: a 2 GB fp32 reduce bucket per rank, and a model under ~1e9
    # parameters never released by ZeRO-3 at all, which then holds as much as ZeRO-0
    # (BENCHMARKS.md, memory). 5e7-element buckets are 100 MB in bf16, still large enough to
    # keep NCCL near full bandwidth; ZeRO-3 keeps at most 1e8 gathered parameters alive.
    "reduce_bucket_size": 50_000_000,
    "allgather_bucket_size": 50_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 100_000_000,
    "stage3_max_reuse_distance": 100_000_000,
    # ZeRO-3 steps the optimizer over sub-groups of this many elements: AdamW's temporaries
    # (its denominators, ~2 copies of what it steps at once) are bounded by them, not by the
    # whole partition (the base DiT's first step at 2 ranks peaked 1.7 GiB higher with 1e9).
    "sub_group_size": 50_000_000,
}


def tune_host_allocator(threshold: int = 4 << 20) -> bool:
    """glibc: allocations of >= `threshold` bytes get their own mapping, returned to the OS when
    freed. Its default adapts the threshold upwards after big frees, so the full-size
    temporaries of building and initialising a ZeRO-3 model stay in the heap: the base DiT's
    ZeRO-3 rank then held 6.7 GiB instead of 3.9 (BENCHMARKS.md, memory). No-op elsewhere."""
    import ctypes  # noqa: PLC0415

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, threshold)
                and libc.mallopt(m_trim_threshold, threshold))


def merged(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, key by key through nested dicts."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    return merged({
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, **ZERO_BUCKETS},
        # Our optimizer is torch's AdamW (its own fused kernel, schedule.adamw): none of
        # DeepSpeed's JIT-compiled optimizers is needed (NOTES-stack).
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }, cfg.deepspeed)


def initialize_engine(model, optimizer, lr_scheduler, ds_config: dict, use_gpu: bool):
    """deepspeed.initialize (torch.distributed already set up by Ray Train) -> the engine."""
    deepspeed = zero.import_deepspeed(use_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler,
                                           config=ds_config,
                                           dist_init_required=False)
    zero.share_fp32_partitions(engine)
    return engine


def time_reduction(engine, monitor: Monitor) -> None:
    """Time the gradient reduction DeepSpeed's backward ends with as the phase "reduce" (the
    rest of the backward stays "forward_backward")."""
    reduce = engine.allreduce_gradients

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - DeepSpeed's signature
        monitor.lap("forward_backward")
        out = reduce(*args, **kwargs)
        monitor.lap("reduce")
        return out

    engine.allreduce_gradients = timed


def ema_module(task, info, ema: EMA, shapes: dict, rank: int,
               device: torch.device) -> torch.nn.Module | None:
    """The EMA weights as a whole float32 module on rank 0 (None elsewhere): a collective, so
    every rank calls it. Built afresh (frozen weights as the task builds them, e.g. a LoRA base),
    without touching the training RNG, and dropped after use, so rank 0 holds a whole model only
    while it validates or exports."""
    weights = zero.gather_fragments(zero.ema_by_name(ema), shapes, rank, device)
    if weights is None:
        return None
    with torch.random.fork_rng(devices=[]):
        module = task.build_model(info)
    with torch.no_grad():
        params = dict(module.named_parameters())
        for name, w in weights.items():
            params[name].copy_(w)
    return module.float().eval().requires_grad_(False).to(device)


class CountedBatches:
    """A pass's batches with the rows they held counted, the short last one included (then
    dropped, as drop_last would), so a pass can be checked against the index."""

    def __init__(self, batches, batch_size: int) -> None:
        self.batches, self.batch_size, self.rows = batches, batch_size, 0

    def __iter__(self):
        for batch in self.batches:
            self.rows += len(batch.keys)
            if len(batch.keys) == self.batch_size:
                yield batch


def batch_stream(shard, cfg: TrainConfig, collate, pass_index: int, bucket_column: str | None):
    """Pass `pass_index` over this worker's split as collated micro-batches: as Ray Data batches
    them, or, with buckets, regrouped so that every batch holds one shape (t2v/data/buckets.py).
    The local shuffle is seeded by (seed, pass): a pass read again shuffles the same way.

    Buckets: Ray Data's blocks are taken whole (batch_size None) and the local shuffle is ours:
    Ray 2.60 fails to concatenate blocks of ragged tensors into one batch when a block's tensors
    share a shape ("could not broadcast input array from shape ... into shape (n,)")."""
    buffer, seed = cfg.data.local_shuffle_buffer, (cfg.seed * 1_000_003 + pass_index) % 2**32
    if bucket_column is None:
        return CountedBatches(shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=False, collate_fn=collate,
            prefetch_batches=cfg.data.prefetch_batches,
            local_shuffle_buffer_size=buffer or None, local_shuffle_seed=seed), cfg.batch_size)
    blocks = shard.iter_batches(batch_size=None, batch_format="numpy",
                                prefetch_batches=cfg.data.prefetch_batches)
    return map(collate, batches_by_shape(blocks, bucket_column, cfg.batch_size, buffer, seed))


class FirstBatchEarly:
    """`batches` with its first item fetched on a thread from the moment this is made.

    A run's first read starts Ray Data's whole pipeline (its split coordinator, read tasks in
    new worker processes); made before the model and the DeepSpeed engine are built, the two
    overlap rather than follow each other (a debug run's first batch came 12.8 s after the
    engine was up on a 2-core EPYC). Only Ray Data is touched on the thread, never a
    collective; what the read raised is raised where the batches are taken."""

    def __init__(self, batches) -> None:
        self.source, self._it = batches, iter(batches)
        self._first, self._error, self._empty = None, None, False
        self._thread = threading.Thread(target=self._fetch, name="t2v-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it)
        except StopIteration:
            self._empty = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._error = e

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        if not self._empty:
            first, self._first = self._first, None
            yield first
        yield from self._it


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(engine, ema: EMA, state: dict, rank: int, world: int,
                    metrics: dict) -> None:
    """Every rank writes its pieces (t2v/train/checkpoint.py); rank 0 adds the trainer state;
    Ray merges them into one checkpoint."""
    with tempfile.TemporaryDirectory(prefix="t2v-ckpt-") as d:
        checkpoint.save_state(engine, ema, d, rank, world)
        if rank == 0:
            Path(d, "trainer.json").write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


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
    say(f"[t2v] fault injection: SIGKILL rank {rank} at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    # DeepSpeed's ZeRO calls a torch collective that torch 2.x deprecates, once per step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    cfg = TrainConfig.model_validate(config["train"])
    if cfg.zero_stage == 3:  # where it matters; elsewhere it costs CPU steps ~5 % (page faults)
        tune_host_allocator()
    info, run_uri = config["data_info"], config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_gpu)
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    task = task_for(cfg)
    # Sequence-parallel groups (a collective; sequence_parallel 1: the plain data-parallel run).
    layout = parallel.make_layout(cfg.sequence_parallel, rank, world, ctx.get_local_rank(),
                                  ctx.get_local_world_size())
    dp = layout.data_parallel
    # Which process is which rank (py-spy, a stuck rank, a chaos test): Ray prefixes the actor.
    say(f"[t2v] rank {rank}/{world}: pid {os.getpid()} on {socket.gethostname()}")

    # The checkpoint is read where it lies (local disk or S3), by byte range: each rank reads
    # the pieces it owns now, never a whole checkpoint (checkpoint.Pieces).
    ckpt = ray.train.get_checkpoint()
    saved, pieces = (checkpoint.open_checkpoint(ckpt.filesystem, ckpt.path) if ckpt
                     else (None, None))
    where = ckpt.path if ckpt else None
    if config.get("resume_from"):  # newer than Ray's (the driver saw it: trainer.resume_point)
        other, other_pieces = checkpoint.open_uri(config["resume_from"])
        if saved is None or other["step"] > saved["step"]:
            if pieces is not None:
                pieces.close()
            saved, pieces, where = other, other_pieces, config["resume_from"]
        else:  # a worker-group restart: Ray's own is newer by now
            other_pieces.close()
    step, samples = (int(saved["step"]), int(saved["samples"])) if saved else (0, 0)
    # Where in the data: the pass is read again in its order and what was taken is skipped.
    pass_index, skip, position_note = checkpoint.data_position(saved, cfg.batch_size, dp)
    shard = ray.train.get_dataset_shard("train")
    column = config.get("bucket_column")  # per-bucket batching (t2v/data/buckets.py)
    clock = config["clock"]  # tells the reader which pass it reads (t2v/data/tarsource.py)
    passes = ray.get(clock.get.remote())[1]  # passes per execution of the stream

    def read_pass(index: int):
        ray.get(clock.set.remote(index))  # before this rank asks for the pass's first block
        return batch_stream(shard, cfg, config["collate"], index, column)

    early = None
    # The first pass starts reading while the engine is built, on the ranks that read: in a
    # sequence-parallel group only the leader iterates the group's split (parallel.Layout).
    if step < cfg.steps and layout.is_leader:
        early = FirstBatchEarly(read_pass(pass_index))
    # Another worker count than the checkpoint's: keep its global batch (elastic resume).
    configured_accum = cfg.grad_accum
    accum, elastic = checkpoint.elastic_accum(cfg.batch_size, cfg.grad_accum, saved, world, dp)
    cfg = cfg.model_copy(update={"grad_accum": accum})
    ds_config = deepspeed_config(cfg, bf16)
    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = zero.build_model(lambda whole: task.build_model(info, whole), cfg.zero_stage,
                             ds_config, device)
    if layout.sp > 1:  # from outside the model: its attention core and forward are swapped
        task.parallelize(model, layout.group)
    if cfg.compile:  # the training model only: validation and export build theirs eagerly
        task.compile(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters only
    opt = adamw(trainable, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, warmup=cfg.optim.warmup_steps, total=cfg.steps, kind=cfg.optim.schedule,
        min_ratio=cfg.optim.min_lr_ratio))
    engine = initialize_engine(model, opt, sched, ds_config, use_gpu)
    # The EMA of this rank's fragments, from the fp32 weights the optimizer starts from.
    ema = EMA(zero.local_fragments(engine.module, rank, world), cfg.ema_decay,
              warmup=cfg.ema_warmup)
    shapes = zero.full_shapes(engine.module)
    if saved is not None:
        t0 = time.time()
        checkpoint.restore_state(engine, ema, saved, pieces, rank, world, sched)
        if rank == 0:
            say(f"[t2v] restored step {saved['step']} from {where}: read "
                f"{pieces.bytes_read / 2**20:.1f} MiB of its "
                f"{pieces.total_bytes / 2**20:.1f} MiB in {time.time() - t0:.1f} s")
        pieces.close()
    task.setup(info, device, torch.bfloat16 if bf16 else torch.float32, rank)

    if rank == 0:
        count = sum(zero.numel(p) for p in model.parameters())
        say(f"[t2v] {cfg.stage} run {cfg.name}: {'resumed at' if step else 'starting at'} "
            f"step {step}/{cfg.steps}, {world} workers"
            f"{f' in {dp} sequence-parallel groups of {layout.sp}' if layout.sp > 1 else ''}"
            f", ZeRO-{cfg.zero_stage}, "
            f"{'bf16' if bf16 else 'fp32'}, {count:,} params "
            f"({sum(s.numel() for s in shapes.values()):,} trainable"
            f"{f', LoRA rank {cfg.lora.rank}' if cfg.lora.rank else ''}); clips "
            f"{info.frames}x{info.height}x{info.width} at {info.fps:g} fps"
            f"{f'; {elastic}' if elastic else ''}")
        if position_note:
            say(f"[t2v] data position: {position_note}")
    monitor = Monitor(cfg, info, run_uri, rank, world, dp, task.count_names)
    monitor.start(step, elastic)
    time_reduction(engine, monitor)

    micro, module, gathered_at = 0, None, None
    # DeepSpeed's fp32 ZeRO-0 clips without keeping the norm (get_global_grad_norm is None)
    # and drops the gradients in step(): measure it here on the steps that log.
    own_norm = cfg.zero_stage == 0 and not bf16
    while step < cfg.steps:
        if early is not None:  # the first pass, already reading
            stream, feed, early = early.source, early, None
        else:
            stream = feed = read_pass(pass_index)
        # Every rank of a sequence-parallel group trains on its leader's batches (layout.batches).
        batches = iter(layout.batches(feed, device, agree=column is not None))
        taken = 0  # micro-batches of this pass, skipped ones included
        if skip:  # resumed inside this pass: what the checkpoint had taken is passed over
            t0 = time.time()
            taken = sum(1 for _ in itertools.islice(batches, skip))
            if rank == 0:
                say(f"[t2v] resumed in the read from pass {pass_index}: passed over the "
                    f"{taken} micro-batches a replica had taken before step {step}, in "
                    f"{time.time() - t0:.1f} s")
            skip = 0
        monitor.wait_start()
        for batch in batches:
            monitor.got_batch(len(batch.keys) if layout.is_leader else 0,  # once per group
                              task.bucket_of(batch) if column else None)
            loss = task.loss(engine, batch, step)
            counts = task.pop_counts()  # once per group, as the samples above
            monitor.add_counts(counts if layout.is_leader else {})
            engine.backward(loss * layout.loss_scale)  # see t2v/train/parallel.py
            monitor.add_loss(loss.detach())
            monitor.lap("forward_backward")
            if own_norm and (micro + 1) % cfg.grad_accum == 0 and monitor.logs_at(step + 1):
                monitor.grad_norm = zero.grad_norm(engine.module)  # reduced, before clipping
            engine.step()
            monitor.lap("optimizer")
            micro, taken = micro + 1, taken + 1
            if micro % cfg.grad_accum:
                monitor.wait_start()
                continue
            step += 1
            samples += cfg.batch_size * dp * cfg.grad_accum
            ema.update(zero.local_fragments(engine.module, rank, world))
            monitor.lap("ema")
            metrics = monitor.step_done(step, engine)
            monitor.lap("log")
            if step % cfg.val_every == 0 or step == cfg.steps:
                module = ema_module(task, info, ema, shapes, rank, device)  # every rank
                if module is not None:
                    with torch.no_grad():
                        val = record_validation(run_uri, step, task.validate(module, step),
                                                fps=info.fps)
                    monitor.validated(step, val)
                    metrics |= {f"val_{k}": v for k, v in val.items()}
                # Rank 0 holds a whole model only to validate, except after the last step: the
                # export below reuses that one rather than gathering the same EMA again.
                module, gathered_at = (module, step) if step == cfg.steps else (None, None)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                state = checkpoint.trainer_state(engine, ema, shapes, step, samples, world,
                                                 configured_accum, dp,
                                                 {"pass": pass_index, "batches": taken})
                save_checkpoint(engine, ema, state, rank, world, metrics | {"step": step})
                maybe_inject_fault(cfg, step, rank, run_uri)
            elif metrics.get("logged"):
                ray.train.report(metrics | {"step": step})
            monitor.lap("checkpoint")  # with validation above; a plain report is small
            if step >= cfg.steps:
                break
            monitor.wait_start()
        else:  # the pass ran to its end on every rank (a break happens on all at one step)
            if isinstance(stream, CountedBatches):  # bucketed passes end at the first rank's
                monitor.pass_done(step, stream.rows if layout.is_leader else 0, passes)
            if taken == 0:  # the same on every rank: equal splits, or agreed pass ends
                raise RuntimeError(
                    f"a whole pass over {cfg.data.shards} gave no batch of {cfg.batch_size} "
                    f"(rank {rank}): fewer samples than batch_size x {dp} readers, or every "
                    "bucket short of a batch")
            pass_index += passes
    if gathered_at != step:  # e.g. resumed at the last step: no validation ran here
        module = ema_module(task, info, ema, shapes, rank, device)  # every rank
    if module is not None:
        out = storage.join(run_uri, "package")
        with torch.no_grad():
            digest = task.export(module, step, out)
        say(f"[t2v] exported model package {out} (sha256 {digest[:12]})")
    monitor.close()
