"""Progress and metrics of a training run: loss, grad norm, lr, throughput, data wait, MFU, ETA.

Every rank calls the same methods at the same steps (the loss mean is an all-reduce); only rank 0
prints and writes TensorBoard, and MLflow or W&B when the config names one (t2v/train/tracking.py).
Peak FLOP/s for MFU are stated, not guessed: `peak_flops` in the config, else 989e12 per GPU
(H100 SXM bf16 dense) or 2.6e11 per CPU worker (fp32 matmul peak measured on the project's 2-core
reference machine, NOTES-stack).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from t2v import storage
from t2v.config import TrainConfig
from t2v.console import say
from t2v.train.schedule import mfu
from t2v.train.task import DataInfo
from t2v.train.tracking import Tracking, open_tracking

GPU_PEAK = 989e12
CPU_PEAK = 2.6e11
PHASES = ("forward_backward", "reduce", "optimizer", "ema", "log", "checkpoint")
"""Where a step's time goes (`Monitor.lap`), besides waiting for data: the loss and its
backward, the gradient reduction that DeepSpeed runs after the backward pass (all of it at
ZeRO-0/1, the part not overlapped with it at ZeRO-2/3; the wait for the slowest rank is
inside), DeepSpeed's step (clipping, AdamW), the EMA update, logging (metrics, TensorBoard,
Ray Train's report) and checkpoints with validation."""


class TensorBoard:
    """A SummaryWriter on local disk, mirrored to RUN/tb/ when the run lives in object storage."""

    def __init__(self, run_uri: str, purge_step: int | None = None) -> None:
        """`purge_step`: the first step a resumed run logs; TensorBoard hides what an earlier
        attempt logged from there on (its events are in older files): no step shown twice."""
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - heavy: rank 0 only

        self.remote = storage.join(run_uri, "tb") if storage.is_s3(run_uri) else None
        local = (tempfile.mkdtemp(prefix="t2v-tb-") if self.remote
                 else str(storage.local_path(storage.join(run_uri, "tb"))))
        self.local = local
        self.writer = SummaryWriter(local, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, hwc_uint8, step: int) -> None:
        self.writer.add_image(tag, hwc_uint8, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.remote:
            for name in os.listdir(self.local):
                storage.upload_file(os.path.join(self.local, name),
                                    storage.join(self.remote, name))

    def close(self) -> None:
        self.writer.close()  # writes its last events
        self._upload()
        if self.remote:  # the local mirror of an object-storage run is a temporary directory
            shutil.rmtree(self.local, ignore_errors=True)


class Monitor:
    def __init__(self, cfg: TrainConfig, info: DataInfo, run_uri: str, rank: int,
                 world: int, data_parallel: int | None = None,
                 count_names: tuple[str, ...] = ()) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.data_parallel = data_parallel or world
        """Replicas reading different samples (world / sequence_parallel)."""
        self.flops_per_sample = float(info.train_flops_per_sample)
        self.tokens_per_sample = int(info.tokens_per_sample)
        self.info_samples = info.train_samples
        self.peak = cfg.peak_flops or (GPU_PEAK if cfg.use_gpu else CPU_PEAK)
        self.run_uri = run_uri
        self.tb: TensorBoard | None = None  # rank 0, from start()
        self.tracker: Tracking | None = None  # rank 0, from start(), when the config names one
        self.history_uri = storage.join(run_uri, "metrics.jsonl")
        self.history: list[dict] = []
        self.loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum, count) since last log
        self.samples = 0
        self.buckets = sorted(info.buckets)
        self.bucket_samples = torch.zeros(len(self.buckets) + 1, dtype=torch.float64)
        """Samples per bucket since the last log (+ one slot for a shape no bucket names)."""
        self.wait = 0.0
        self._wait0 = time.perf_counter()
        self.phases = dict.fromkeys(PHASES, 0.0)
        """Seconds in each phase of a step since the last log (`lap`)."""
        self.grad_norm: float | None = None
        """Set by the worker when the engine keeps no gradient norm (fp32 ZeRO-0)."""
        self.count_names = tuple(count_names)
        self.counts = torch.zeros(len(self.count_names), dtype=torch.float64)
        """The task's per-sample events since the last log (StageTask.count_names)."""
        self._lap0 = time.perf_counter()
        self.t_log = self.t_start = time.perf_counter()
        self.steps_at_start: int | None = None
        self.last_logged = 0

    def start(self, step: int, note: str | None = None) -> None:
        """Load the history of earlier attempts (dropping steps past `step`) and note the start:
        workers, batch settings and what an elastic resume changed."""
        if self.rank != 0:
            return
        # Steps after the restored one (after 0 too: a restart before the first checkpoint)
        # were logged by an attempt that died: hidden from here.
        self.tb = TensorBoard(self.run_uri, purge_step=step + 1)
        self.tracker = open_tracking(self.cfg, self.run_uri)
        if storage.exists(self.history_uri):
            rows = [json.loads(x) for x in storage.read_text(self.history_uri).splitlines() if x]
            self.history = [r for r in rows if r.get("step", 0) <= step]
        c = self.cfg
        self.record({"event": "start", "step": step, "time": time.time(), "workers": self.world,
                     "sequence_parallel": self.world // self.data_parallel,
                     "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                     "global_batch": c.batch_size * c.grad_accum * self.data_parallel}
                    | ({"note": note} if note else {}))

    def record(self, row: dict) -> None:
        """Append to RUN/metrics.jsonl (rewritten whole: small, and atomic on S3 too)."""
        if self.rank != 0:
            return
        self.history.append(row)
        storage.write_text(self.history_uri, "".join(json.dumps(r) + "\n" for r in self.history))

    def wait_start(self) -> None:
        self._wait0 = time.perf_counter()

    def lap(self, phase: str) -> None:
        """The time since the last lap (or the batch's arrival) was spent in `phase`."""
        now = time.perf_counter()
        self.phases[phase] += now - self._lap0
        self._lap0 = now

    def got_batch(self, n: int, bucket: str | None = None) -> None:
        self._lap0 = time.perf_counter()
        self.wait += self._lap0 - self._wait0
        self.samples += n
        if bucket is not None:
            i = self.buckets.index(bucket) if bucket in self.buckets else len(self.buckets)
            self.bucket_samples[i] += n

    def add_counts(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.counts[self.count_names.index(name)] += n

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += torch.tensor([float(loss), 1.0], dtype=torch.float64)

    def logs_at(self, step: int) -> bool:
        """Whether `step_done(step)` logs."""
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def step_done(self, step: int, engine) -> dict:
        if self.steps_at_start is None:
            self.steps_at_start = self.last_logged = step - 1
        if not self.logs_at(step):
            return {}
        now = time.perf_counter()
        elapsed = max(now - self.t_log, 1e-9)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
        stats = torch.tensor([*self.loss_sum.tolist(), self.samples, self.wait,
                              *self.phases.values(), *self.counts.tolist(),
                              *self.bucket_samples.tolist()],
                             dtype=torch.float64)
        peak = torch.tensor([rss], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)  # sums over ranks
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        loss_sum, count, samples, wait, *rest = stats.tolist()
        phases, rest = rest[:len(PHASES)], rest[len(PHASES):]
        counts, per_bucket = rest[:len(self.count_names)], rest[len(self.count_names):]
        steps = max(step - self.last_logged, 1)
        per_worker = samples / self.world / elapsed
        gnorm = engine.get_global_grad_norm()
        gnorm, self.grad_norm = (self.grad_norm if gnorm is None else gnorm), None
        metrics = {
            "logged": True,
            "loss": loss_sum / max(count, 1),
            "grad_norm": float(gnorm) if gnorm is not None else float("nan"),
            "lr": float(engine.get_lr()[0]),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": samples / elapsed * self.tokens_per_sample,
            "data_wait_frac": wait / self.world / elapsed,
            "mfu": mfu(per_worker * self.flops_per_sample, self.peak),
            "worker_peak_rss_mb": float(peak.item()),
            # Seconds per step in each phase, the mean over ranks (data: waiting for a batch).
            "phase_data": wait / self.world / steps,
            **{f"phase_{k}": v / self.world / steps for k, v in zip(PHASES, phases, strict=True)},
            # e.g. alt_caption_frac: the share of samples that trained on an alternative caption
            **{f"{k}_frac": v / max(samples, 1)
               for k, v in zip(self.count_names, counts, strict=True)},
        }
        done = step - (self.steps_at_start or 0)
        rate = done / max(now - self.t_start, 1e-9)
        metrics["eta_s"] = (self.cfg.steps - step) / rate if rate > 0 else float("nan")
        if self.rank == 0:
            say(f"[train] step {step}/{self.cfg.steps} loss {metrics['loss']:.4f} "
                f"gnorm {metrics['grad_norm']:.3f} lr {metrics['lr']:.2e} "
                f"{metrics['samples_per_s']:.1f} samples/s {metrics['tokens_per_s']:.0f} tok/s "
                f"wait {100 * metrics['data_wait_frac']:.1f}% MFU {100 * metrics['mfu']:.1f}% "
                f"ETA {metrics['eta_s']:.0f}s")
            scalars = {f"train/{k}": v for k, v in metrics.items() if k != "logged"}
            self.tb.scalars(scalars, step)
            self.tb.flush()
            if self.tracker is not None:
                self.tracker.metrics(scalars, step)
            row = {"step": step, **{k: v for k, v in metrics.items() if k != "logged"}}
            if any(per_bucket):  # samples per bucket in this interval, every rank's
                names = [*self.buckets, "other"]
                row["buckets"] = {k: int(v) for k, v in zip(names, per_bucket, strict=True) if v}
            self.record(row)
        self.loss_sum.zero_()
        self.samples, self.wait, self.t_log = 0, 0.0, time.perf_counter()
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.last_logged = step
        self.bucket_samples.zero_()
        self.counts.zero_()
        return metrics

    def validated(self, step: int, val: dict[str, float]) -> None:
        """Rank 0, after `record_validation` (t2v/train/validation.py) wrote RUN/samples/step_N/:
        its metrics to metrics.jsonl, and they and the folder's files to the tracker."""
        self.record({"step": step, "val": val})
        if self.tracker is None:
            return
        self.tracker.metrics({f"val/{k}": v for k, v in val.items()}, step)
        folder = f"samples/step_{step:06d}"
        where = storage.join(self.run_uri, folder)
        for uri in storage.list_prefix(where):  # mp4s, GIFs, sheet.png, captions.json
            self.tracker.artifact(uri, f"{folder}/{uri[len(where):].lstrip('/')}", step)

    def pass_done(self, step: int, rows: int, passes: int = 1) -> None:
        """A full read of the training stream (`passes` passes over the data) gave `rows` on
        this rank: compared, summed over ranks, with what the index lists, times `passes`.
        Ray's equal splits drop fewer than one row per data-parallel reader a read; more
        missing means damaged shards (each named on the log as it is read:
        t2v/data/tarsource.py) or samples that failed to decode. Collective."""
        total = torch.tensor([rows], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        if self.rank != 0 or self.info_samples is None:
            return
        expected = self.info_samples * passes
        read = int(total.item())
        missing = expected - read
        self.record({"event": "pass", "step": step, "rows": read, "index_rows": expected,
                     "missing": missing, "passes": passes})
        if missing >= self.data_parallel:  # Ray's split drops < 1 row per reader a read
            what = f"{passes} passes" if passes > 1 else "pass"
            say(f"[t2v] the {what} ending at step {step} read {read} of the {expected} "
                f"training samples the index lists: {missing} missing (damaged shards and "
                "undecodable samples are named above)")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.tracker is not None:
            self.tracker.finish()
