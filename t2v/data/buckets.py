"""Duration/resolution buckets: a clip trains at the bucket nearest its own shape.

A bucket is frames x height x width. `t2v pack --buckets` puts every clip in one (trimming its end
and cropping its borders the least), records it in the sample's json, and `t2v encode` keeps the
clip's size; training batches only same-shape samples (`batches_by_shape`), so a landscape,
a portrait and a square clip each keep their framing instead of being centre-cropped to one size.

Choosing a bucket for a clip of T frames at H x W (only buckets of at most T frames qualify: a
clip is trimmed, never padded or looped):

    kept = min(a_b / a_c, a_c / a_b) * F_b / T      a = width / height, F_b the bucket's frames

the share of the clip's pixels x time a resize-to-cover + centre crop + trim keeps. The best
`kept` wins; among equals, the largest bucket the clip covers without upscaling, else the
smallest that upscales it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"bucket {text!r} is not FRAMESxHEIGHTxWIDTH (e.g. 17x32x48)")
        bucket = cls(*(int(g) for g in m.groups()))
        if bucket.frames < 1 or bucket.height < 2 or bucket.width < 2:
            raise ValueError(f"bucket {text!r}: frames >= 1, height and width >= 2")
        return bucket


def _grid(frames: Sequence[int], sizes: Sequence[tuple[int, int]]) -> tuple[Bucket, ...]:
    return tuple(Bucket(f, h, w) for f in frames for h, w in sizes)


BUCKET_PRESETS: dict[str, tuple[Bucket, ...]] = {
    # Tests and laptops: <= 64 px, <= 17 frames; square, 3:2 landscape and portrait. Sides are
    # multiples of 16 (VAE spatial_down 4-8 x DiT patch 2).
    "debug": _grid((9, 17), ((32, 32), (32, 48), (48, 32), (48, 48), (48, 64), (64, 48))),
    # Wan 2.1's 480p family (sides multiples of 16, ~400k pixels each): 16:9 and 4:3 both ways
    # and square; 2, 3 and 5 s at 16 fps (1 + 4k frames for the causal VAE).
    "480p": _grid((33, 49, 81), ((480, 832), (832, 480), (544, 720), (720, 544), (624, 624))),
}


def parse_buckets(spec: str | Sequence[str]) -> tuple[Bucket, ...]:
    """A preset name, or buckets as "9x32x32,17x32x48" or a list of such -> sorted buckets."""
    if isinstance(spec, str):
        if spec.strip() in BUCKET_PRESETS:
            return BUCKET_PRESETS[spec.strip()]
        parts = [p for p in spec.split(",") if p.strip()]
    else:
        parts = list(spec)
    if not parts:
        raise ValueError(f"buckets: give a preset ({', '.join(BUCKET_PRESETS)}) or "
                         "FRAMESxHEIGHTxWIDTH,...")
    try:
        return tuple(sorted({Bucket.parse(p) for p in parts}))
    except ValueError as e:
        if isinstance(spec, str) and "x" not in spec:
            raise ValueError(f"buckets {spec!r}: not a preset ({', '.join(BUCKET_PRESETS)}) nor "
                             "FRAMESxHEIGHTxWIDTH,...") from None
        raise e from None


def kept_share(bucket: Bucket, frames: int, height: int, width: int) -> float:
    """Share of a T x H x W clip's pixels x time that the bucket keeps (module docstring)."""
    a_b, a_c = bucket.width / bucket.height, width / height
    return min(a_b / a_c, a_c / a_b) * bucket.frames / frames


def choose_bucket(frames: int, height: int, width: int,
                  buckets: Sequence[Bucket]) -> Bucket:
    """The bucket for a clip of `frames` at `height` x `width`; ValueError (the skip reason) when
    the clip is shorter than every bucket."""
    fits = [b for b in buckets if b.frames <= frames]
    if not fits:
        shortest = min(b.frames for b in buckets)
        raise ValueError(f"too short: {frames} frames < {shortest}, the shortest bucket's")

    def rank(b: Bucket) -> tuple[float, bool, int]:
        upscales = b.height > height or b.width > width
        area = b.height * b.width
        return round(kept_share(b, frames, height, width), 9), not upscales, (
            -area if upscales else area)

    return max(fits, key=rank)


def batches_by_shape(batches: Iterable[dict[str, np.ndarray]], column: str, batch_size: int,
                     shuffle_buffer: int = 0, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Per-bucket batching of a stream: numpy batches of rows of mixed shapes -> batches of
    `batch_size` rows whose `column` has one shape, each yielded as soon as it is full (so every
    bucket is drawn in proportion to its samples in the stream). Rows left in part-full buckets
    when the stream ends are dropped, as `drop_last` drops a short last batch; the next pass
    reshuffles them. `shuffle_buffer` > 0: rows pass through a buffer of that many, drawn at
    random (seeded), before they are grouped."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    for row in _shuffled(_rows(batches), shuffle_buffer, seed):
        rows = pending.setdefault(np.shape(row[column]), [])
        rows.append(row)
        if len(rows) == batch_size:
            del pending[np.shape(row[column])]
            yield {k: _stack([r[k] for r in rows]) for k in row}


def _rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict]:
    for batch in batches:
        names = list(batch)
        for i in range(len(batch[names[0]])):
            yield {k: batch[k][i] for k in names}


def _shuffled(rows: Iterator[dict], buffer: int, seed: int) -> Iterator[dict]:
    if buffer <= 1:
        yield from rows
        return
    rng, held = np.random.default_rng(seed), []
    for row in rows:
        held.append(row)
        if len(held) == buffer:
            i = int(rng.integers(buffer))
            held[i], held[-1] = held[-1], held[i]
            yield held.pop()
    rng.shuffle(held)
    yield from held


def _stack(values: list) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    out = np.empty(len(values), dtype=object)  # str / bytes stay Python objects
    out[:] = values
    return out
