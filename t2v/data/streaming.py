"""Ray Data streaming of raw shards into torch batches (the Ray side of t2v/data).

Shards are read straight from their URI (local or s3://) by our tar datasource (t2v/data/
tarsource.py: a pass order training can resume, damaged shards named); clips are decoded
by Ray Data tasks into uint8 arrays (4x smaller in the object store than float32), and turned
into float tensors in [-1, 1] only at the consumer, in the collate function (t2v/data/
collate.py: this module, loaded by every read task, does not import torch). A clip that fails to
decode is dropped and recorded in a `SkipLog` actor, so the job goes on and the count is exact.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

from t2v import storage
from t2v.config import ReaderConfig
from t2v.data.shards import shard_uris
from t2v.data.tarsource import tar_dataset
from t2v.data.video import VideoDecodeError, decode_video

if TYPE_CHECKING:
    from t2v.data.collate import VideoBatch


@ray.remote(num_cpus=0)
class SkipLog:
    """Collects dropped samples from every decode task of one data set."""

    def __init__(self) -> None:
        self.skips: list[dict] = []

    def add(self, key: str, url: str, reason: str) -> None:
        self.skips.append({"key": key, "url": url, "reason": reason})

    def get(self) -> list[dict]:
        return list(self.skips)


def log_damaged_shard(skip_log, uri: str, message: str) -> None:  # noqa: ANN001 - a SkipLog
    """A shard that ended early (tarsource.read_shard's one line), recorded with the skips."""
    ray.get(skip_log.add.remote("*", uri, message))


def _as_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


class DecodeClip:
    """Row -> [decoded row] or [] (dropped and logged). Runs inside Ray Data tasks."""

    def __init__(self, frames: int, size: int | None, fps: float | None, skip_log) -> None:
        self.frames, self.size, self.fps, self.skip_log = frames, size, fps, skip_log

    def _skip(self, key: str, url: str, reason: str) -> list[dict]:
        ray.get(self.skip_log.add.remote(key, url, reason))  # synchronous: counts must be exact
        return []

    def __call__(self, row: dict) -> list[dict]:
        key, url = _as_text(row.get("__key__")), _as_text(row.get("__url__"))
        data = row.get("mp4")
        if not isinstance(data, bytes | bytearray) or not data:
            return self._skip(key, url, "no mp4 member")
        try:
            clip = decode_video(bytes(data), fps=self.fps, num_frames=self.frames,
                                size=self.size, source=f"{url}:{key}")
        except VideoDecodeError as e:
            return self._skip(key, url, str(e))
        if clip.shape[0] < self.frames:
            return self._skip(key, url, f"too short: {clip.shape[0]} < {self.frames} frames")
        meta = row.get("json")
        meta_text = meta.decode("utf-8", "replace") if isinstance(meta, bytes) else json.dumps(
            meta if meta is not None else {})
        return [{"video": clip, "caption": _as_text(row.get("txt")), "key": key,
                 "meta": meta_text}]


@dataclass
class VideoStream:
    """A streaming data set of decoded clips and the log of what it dropped."""

    dataset: ray.data.Dataset
    skip_log: ray.actor.ActorHandle
    num_shards: int

    def iter_batches(self, batch_size: int, drop_last: bool = False,
                     prefetch_batches: int = 2) -> Iterator[VideoBatch]:
        from t2v.data.collate import VideoCollate  # noqa: PLC0415 - torch: read tasks load this module

        yield from self.dataset.iter_torch_batches(
            batch_size=batch_size, collate_fn=VideoCollate(), drop_last=drop_last,
            prefetch_batches=prefetch_batches)

    def skipped(self) -> list[dict]:
        return ray.get(self.skip_log.get.remote())

    def skip_counts(self) -> Counter:
        return Counter(s["reason"].split(":")[0] for s in self.skipped())


def video_stream(cfg: ReaderConfig, uris: list[str] | None = None,
                 clock=None) -> VideoStream:  # noqa: ANN001 - a PassClock handle
    """Build (lazily: nothing is read until iteration) the decoded-clip stream of `cfg.shards`.

    `uris` restricts it to these shards (training keeps its held-out shard out this way). With
    a `shuffle_seed`, each pass reads the shard files in the order `pass_order(seed, pass)`,
    the pass being `clock`'s (training's) or 0.
    """
    uris = uris if uris is not None else shard_uris(cfg.shards)
    if not uris:
        raise storage.StorageError(f"{cfg.shards}: no shard-*.tar found")
    skip_log = SkipLog.options(name=f"t2v-skiplog-{uuid.uuid4().hex[:8]}").remote()
    ds = tar_dataset(uris, ("mp4", "txt", "json"), seed=cfg.shuffle_seed, clock=clock,
                     on_damage=functools.partial(log_damaged_shard, skip_log))
    ds = ds.flat_map(DecodeClip(cfg.frames, cfg.size, cfg.fps, skip_log))
    # A shard decodes to hundreds of MB; smaller blocks keep the in-flight window (and so the
    # object store and the consumer's memory) small without changing what is read.
    ds.context.target_max_block_size = cfg.max_block_mb * 2**20
    return VideoStream(dataset=ds, skip_log=skip_log, num_shards=len(uris))
