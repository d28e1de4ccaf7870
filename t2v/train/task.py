"""One task per training stage (the torchtitan pattern): what differs between training the VAE
and the DiT lives in one class each (vae_task.py, dit_task.py), chosen once by
`t2v.train.stages.task_for`; the driver (trainer.py) and the worker loop (worker.py) never ask
which stage they run.

A task is built on the driver, where it checks the config, reads the held-out shard into a
`DataInfo` and makes the Ray Data stream; and on every worker, where it builds the model and turns
a micro-batch into a loss; on rank 0 it also validates and exports the package.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from t2v.config import TrainConfig
from t2v.data.shards import iter_shard_samples
from t2v.data.video import VideoDecodeError, decode_video
from t2v.models.dit import Whole

VAL_COUNT = 8
"""Held-out samples used by validation."""


@dataclass
class DataInfo:
    """What the driver learned about the data; sent to every worker (Ray pickles it).

    Bucketed data (`t2v pack --buckets`): the geometry is the bucket with the most training
    samples; the throughput counters are those of the held-out clips' shape."""

    frames: int
    height: int
    width: int
    """The clips the run trains on: a DiT package renders at this size unless told otherwise."""
    fps: float
    """Frame rate of those clips (the data's own, from each sample's json)."""
    tokens_per_sample: int
    """Tokens the model sees per sample (DiT patches; VAE pixels), for throughput."""
    train_flops_per_sample: float
    """Forward + backward FLOPs of one sample, for MFU."""
    train_samples: int | None = field(default=None, kw_only=True)
    """Samples the index lists for the training shards (None: no index): each full pass over
    the stream is checked against it (t2v/train/monitor.py `pass_done`)."""
    buckets: dict[str, int] = field(default_factory=dict, kw_only=True)
    """Training samples per bucket (FRAMESxHEIGHTxWIDTH) as the data's index records them; {}
    when it records none. Two or more: batches are formed per bucket (t2v/data/buckets.py)."""


@dataclass
class Validation:
    """What one validation pass produced: scalar metrics and pictures."""

    metrics: dict[str, float]
    clips: dict[str, np.ndarray] = field(default_factory=dict)
    """Name -> uint8 video (T, H, W, 3), written as mp4 + GIF under RUN/samples/step_N/."""
    sheet: np.ndarray | None = None
    """A contact sheet (H, W, 3) uint8 for TensorBoard and RUN/samples/step_N/sheet.png."""
    captions: list[str] | None = None


@dataclass
class HeldOutClip:
    key: str
    frames: np.ndarray
    """uint8 (T, H, W, 3)."""
    caption: str
    meta: dict


def read_clips(uri: str, frames: int, size: int | None, count: int) -> list[HeldOutClip]:
    """Up to `count` clips of exactly `frames` frames (resized to `size` when given) from raw
    shards at `uri`; undecodable or short clips are passed over."""
    out: list[HeldOutClip] = []
    for key, fields in iter_shard_samples([uri]):
        try:
            clip = decode_video(fields.get("mp4", b""), num_frames=frames,
                                size=(size, size) if size else None, source=f"{uri}:{key}")
        except VideoDecodeError:
            continue
        if clip.shape[0] != frames:
            continue
        try:
            meta = json.loads(fields["json"]) if "json" in fields else {}
        except ValueError:
            meta = {}
        out.append(HeldOutClip(key, clip, fields.get("txt", b"").decode(errors="replace"),
                               meta if isinstance(meta, dict) else {}))
        if len(out) == count:
            break
    if not out:
        raise ValueError(f"{uri}: no held-out clip of {frames} frames could be decoded")
    return out


def clip_fps(metas: list[dict]) -> float:
    """The data's frame rate from sample metadata (pack and synth record it); 8 if none does."""
    rates = [float(m["fps"]) for m in metas if isinstance(m.get("fps"), int | float)]
    return max(set(rates), key=rates.count) if rates else 8.0


def load_weights(model: nn.Module, state: Mapping[str, Tensor], whole: Whole | None) -> None:
    """`model.load_state_dict(state, strict=True)`, one parameter at a time inside `whole` when
    given (a ZeRO-3-partitioned model then never holds more than one whole parameter)."""
    if whole is None:
        model.load_state_dict(state, strict=True)
        return
    want = set(model.state_dict())
    if set(state) != want:
        diff = sorted(set(state) ^ want)
        raise ValueError(f"weights do not match the model: {', '.join(diff[:3])}"
                         f"{' ...' if len(diff) > 3 else ''}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            with whole([p]):
                value = state[name]
                if value.shape != p.shape:  # copy_ would broadcast
                    raise ValueError(f"weights do not match the model: {name} is "
                                     f"{tuple(value.shape)}, the model's {tuple(p.shape)}")
                p.copy_(value)
        for name, b in model.named_buffers():
            if name in state:
                b.copy_(state[name])


class StageTask(ABC):
    """The stage-specific half of a training run. Subclasses set `stage` and fill in each step."""

    stage: str

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.counted: Counter[str] = Counter()
        """Per-sample events `loss` counts (names in `count_names`); the worker hands them to
        the monitor, which logs each as a fraction of the interval's samples (NAME_frac)."""

    @property
    def count_names(self) -> tuple[str, ...]:
        """The events `loss` counts in this run (fixed for the run: summed over ranks)."""
        return ()

    def pop_counts(self) -> dict[str, int]:
        out = dict(self.counted)
        self.counted.clear()
        return out

    # ------------------------------------------------------------------------- driver

    def check(self) -> None:
        """Refuse, on the driver and in one line, a config this stage cannot run."""
        if self.cfg.lora.rank:
            raise ValueError(f"lora.rank={self.cfg.lora.rank} needs stage dit and init_from="
                             f"PACKAGE (got stage {self.stage})")
        if self.cfg.sequence_parallel > 1:
            raise ValueError(f"sequence_parallel={self.cfg.sequence_parallel} needs stage dit "
                             f"(got stage {self.stage})")
        if self.cfg.compile:
            raise ValueError(f"compile=true is for stage dit (got stage {self.stage}: its "
                             "step is mostly convolutions, which compiling does not speed up)")

    @abstractmethod
    def describe_data(self, val_uri: str, buckets: dict[str, int]) -> DataInfo:
        """Read the held-out shard `val_uri`; geometry, FLOPs and validation data. `buckets`:
        training samples per bucket (DataInfo.buckets)."""

    def bucket_column(self, buckets: dict[str, int]) -> str | None:
        """The stream column whose shape is a sample's bucket when training batches per bucket
        (None: one shape, batched as the stream comes). This stage's readers crop raw clips to
        `data.size`, or keep stored sizes; bucketed raw shards then need that size."""
        if len(buckets) > 1 and self.cfg.data.size is None:
            raise ValueError(f"{self.cfg.data.shards}: the clips come in {len(buckets)} buckets "
                             f"({', '.join(buckets)}); stage {self.stage} reads raw clips at one "
                             "size: set data.size (or train the DiT on latents from t2v encode, "
                             "which batches per bucket)")
        return None

    def bucket_of(self, batch: object) -> str:
        """The bucket name of a one-shape batch (for per-bucket counts)."""
        raise NotImplementedError(f"stage {self.stage} batches clips of one size")

    @abstractmethod
    def dataset(self, train: list[str], clock):  # noqa: ANN001, ANN201 - (Dataset, collate)
        """The Ray Data stream of the training shards and its collate function; each pass
        reads the shards in `pass_order(data.shuffle_seed, clock's pass)`."""

    # ------------------------------------------------------------------------- workers

    @abstractmethod
    def build_model(self, info: DataInfo, whole: Whole | None = None) -> nn.Module:
        """The module DeepSpeed wraps (identical init on every rank: the caller seeds torch).

        At ZeRO-3 it is called inside `deepspeed.zero.Init`: parameters are partitioned as soon
        as their layer exists, and whatever touches a built parameter (init, loading weights)
        does so inside `whole(params)` (see `load_weights`)."""

    def parallelize(self, model: nn.Module, group: object) -> nn.Module:
        """Split each sample's tokens across the ranks of `group` (sequence parallelism), in
        place; only stages whose `check` allows sequence_parallel > 1 implement it."""
        raise NotImplementedError(f"stage {self.stage} has no sequence parallelism")

    def compile(self, model: nn.Module) -> None:
        """`torch.compile` the training model in place (train.compile); only stages whose
        `check` allows compile implement it."""
        raise NotImplementedError(f"stage {self.stage} has no compile")

    def setup(self, info: DataInfo, device: torch.device, dtype: torch.dtype,
              rank: int) -> None:
        """Per-worker state before the first step (rank 0 also validates and exports)."""
        self.info, self.device, self.dtype = info, device, dtype

    @abstractmethod
    def loss(self, engine: nn.Module, batch: object, step: int) -> Tensor:
        """One micro-batch (as collated on the worker's CPU) -> the scalar loss."""

    # ------------------------------------------------------------------------- rank 0

    @abstractmethod
    def validate(self, module: nn.Module, step: int) -> Validation:
        """Held-out metrics and pictures on the EMA `module`."""

    @abstractmethod
    def export(self, module: nn.Module, step: int, uri: str) -> str:
        """Write the model package at `uri` from the EMA `module`; returns its content hash."""
