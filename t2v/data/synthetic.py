"""Synthetic "shapes" clips: coloured shapes moving on a plain background.

This is the one place that defines the shapes vocabulary (DESIGN.md "Shapes vocabulary"): the
generator, captions, the eval detector and benchmark prompt files all use these spellings.
Every clip is a pure function of (seed, index), so a data set can be regenerated bit for bit.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from t2v import storage
from t2v.config import SynthConfig
from t2v.configfile import save_resolved
from t2v.data.shards import ShardWriter
from t2v.data.video import encode_mp4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Unit direction in image coordinates (x right, y down).
MOTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}

MOVING_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} moving {motion}",
    "{colour} {shape} moves {motion}",
    "a {shape} in {colour} going {motion}",
    "video of a {colour} {shape} sliding {motion}",
)
STILL_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} staying still",
    "a still {colour} {shape}",
    "a {shape} in {colour} standing still",
    "video of a {colour} {shape} that is still",
)

# Shorter captions of a clip, each leaving out attributes (keyed by what they leave out; the
# moving templates, then the still ones, matched to the clip's template): what a recaptioner's
# short captions are to its long one. Training on them now and then (the clip's json
# `captions`, TrainConfig.alt_caption_prob) makes each word drive its attribute on its own,
# where full captions alone let a model bind shape to the colour and motion it was seen with.
PARTIAL_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (("a {shape} moving {motion}", "{shape} moves {motion}", "a {shape} going {motion}",
                "video of a {shape} sliding {motion}"),
               ("a {shape} staying still", "a still {shape}", "a {shape} standing still",
                "video of a {shape} that is still")),
    "motion": (("a {colour} {shape}", "{colour} {shape}", "a {shape} in {colour}",
                "video of a {colour} {shape}"),) * 2,
    "colour+motion": (("a {shape}", "{shape}", "a {shape}", "video of a {shape}"),) * 2,
}


@dataclass(frozen=True)
class Combo:
    """One colour x shape x motion combination, spelled "red circle left"."""

    colour: str
    shape: str
    motion: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape} {self.motion}"

    @classmethod
    def parse(cls, text: str) -> Combo:
        parts = text.split()
        if len(parts) != 3:
            raise ValueError(f"combination {text!r}: expected 'COLOUR SHAPE MOTION'")
        colour, shape, motion = parts
        for value, vocab, field in (
            (colour, COLOURS, "colour"),
            (shape, SHAPES, "shape"),
            (motion, MOTIONS, "motion"),
        ):
            if value not in vocab:
                raise ValueError(f"combination {text!r}: unknown {field} {value!r}, "
                                 f"expected one of {sorted(vocab)}")
        return cls(colour, shape, motion)


def all_combos() -> list[Combo]:
    return [Combo(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS)]


def heldout_combos(n: int, seed: int = 1234) -> list[Combo]:
    """A held-out set that still covers every colour, shape and motion in training.

    Chosen so that each held-out combination's colour, shape and motion each still appear in
    training with other partners: the test is compositional generalisation, not unseen words.
    """
    combos = all_combos()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    chosen: list[Combo] = []
    for i in order:
        if len(chosen) == n:
            break
        chosen.append(combos[i])
    return sorted(chosen, key=str)


def caption(objects: list[ObjectSpec], template: int) -> str:
    parts = []
    for obj in objects:
        pool = STILL_TEMPLATES if obj.motion == "still" else MOVING_TEMPLATES
        parts.append(pool[template % len(pool)].format(
            colour=obj.colour, shape=obj.shape, motion=obj.motion))
    return " and ".join(parts)


def alternative_captions(objects: list[ObjectSpec], template: int) -> list[str]:
    """The clip's shorter captions: without colour, without motion, shape alone (PARTIAL_TEMPLATES)."""
    out = []
    for moving, still in PARTIAL_TEMPLATES.values():
        out.append(" and ".join(
            (still if obj.motion == "still" else moving)[template % len(moving)].format(
                colour=obj.colour, shape=obj.shape, motion=obj.motion) for obj in objects))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    radius: float
    """Half the object's extent, pixels."""
    start: tuple[float, float]
    """Centre (x, y) at frame 0, pixels."""
    speed: float
    """Pixels per frame along the motion direction."""

    def centre(self, t: int) -> tuple[float, float]:
        dx, dy = MOTION_VECTORS[self.motion]
        return self.start[0] + dx * self.speed * t, self.start[1] + dy * self.speed * t


@dataclass(frozen=True)
class ClipSpec:
    key: str
    objects: list[ObjectSpec]
    background: tuple[int, int, int]
    frames: int
    size: int
    fps: float
    template: int

    @property
    def caption(self) -> str:
        return caption(self.objects, self.template)

    @property
    def alternative_captions(self) -> list[str]:
        return alternative_captions(self.objects, self.template)

    def meta(self) -> dict:
        """Ground truth stored in the sample's json (the main object is objects[0])."""
        main = self.objects[0]
        return {
            "key": self.key,
            "colour": main.colour,
            "shape": main.shape,
            "motion": main.motion,
            "count": len(self.objects),
            "objects": [asdict(o) for o in self.objects],
            "background": list(self.background),
            "frames": self.frames,
            "height": self.size,
            "width": self.size,
            "fps": self.fps,
            "source": "synthetic",
        }


TRAVEL = (0.35, 0.5)
"""How far a moving object goes over a clip, as a range of fractions of the frame side."""
RADIUS = (0.14, 0.2)
"""An object's radius (half its extent), as a range of fractions of the frame side."""


def _place(combo: Combo, size: int, frames: int, rng: np.random.Generator,
           travel_range: tuple[float, float] = TRAVEL,
           radius_range: tuple[float, float] = RADIUS) -> ObjectSpec:
    radius = float(rng.uniform(*radius_range) * size)
    margin = radius + 1.0
    # Travel about a third of the frame or more, so the direction is unambiguous at 32x32.
    travel = float(rng.uniform(*travel_range) * size) if combo.motion != "still" else 0.0
    travel = min(travel, size - 2 * margin)  # a path longer than the frame leaves: shortened
    speed = travel / max(frames - 1, 1)
    dx, dy = MOTION_VECTORS[combo.motion]
    lo_x, hi_x = margin, size - margin
    lo_y, hi_y = margin, size - margin
    # Start so that the whole path stays inside the frame.
    if dx < 0:
        lo_x += travel
    elif dx > 0:
        hi_x -= travel
    if dy < 0:
        lo_y += travel
    elif dy > 0:
        hi_y -= travel
    x = float(rng.uniform(lo_x, max(lo_x, hi_x)))
    y = float(rng.uniform(lo_y, max(lo_y, hi_y)))
    return ObjectSpec(combo.colour, combo.shape, combo.motion, radius, (x, y), speed)


def _apart(a: ObjectSpec, b: ObjectSpec, frames: int) -> bool:
    """True when the two objects never overlap (bounding circles apart in every frame)."""
    gap = (a.radius + b.radius) * 1.28  # a square's corner reaches 0.9 * sqrt(2) = 1.27 r
    return all(math.dist(a.centre(t), b.centre(t)) > gap for t in range(frames))


def clip_spec(index: int, *, seed: int, frames: int, size: int, fps: float = 8.0,
              allowed: list[Combo], two_object_prob: float = 0.0,
              key_prefix: str = "synth", travel: tuple[float, float] = TRAVEL,
              radius: tuple[float, float] = RADIUS) -> ClipSpec:
    """The deterministic description of clip `index` of the data set with this `seed`."""
    rng = np.random.default_rng([seed, index])
    main = allowed[int(rng.integers(len(allowed)))]
    objects = [_place(main, size, frames, rng, travel, radius)]
    if rng.random() < two_object_prob:
        others = [c for c in allowed if c.colour != main.colour and c.shape != main.shape]
        if others:
            combo = others[int(rng.integers(len(others)))]
            # Keep both objects whole: redraw the second one's path (up to 50 tries) until the
            # two never overlap, so "count" and each object's shape are in every frame.
            for _ in range(50):
                second = _place(combo, size, frames, rng, travel, radius)
                if _apart(objects[0], second, frames):
                    objects.append(second)
                    break
    grey = int(rng.integers(0, 50))
    return ClipSpec(
        key=f"{key_prefix}-{seed:04d}-{index:07d}",
        objects=objects,
        background=(grey, grey, grey),
        frames=frames,
        size=size,
        fps=fps,
        template=int(rng.integers(len(MOVING_TEMPLATES))),
    )


def _coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float,
              r: float) -> np.ndarray:
    """Boolean mask of the shape on a (supersampled) pixel grid."""
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        s = r * 0.9  # a square of the same "radius" looks much bigger than the circle
        return (np.abs(xs - cx) <= s) & (np.abs(ys - cy) <= s)
    if shape == "triangle":
        # Upward equilateral-ish triangle inscribed in the radius-r circle.
        top = cy - r
        bottom = cy + 0.6 * r
        half = (ys - top) / (bottom - top) * r * 1.05
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(spec: ClipSpec, supersample: int = 4) -> np.ndarray:
    """uint8 (T, H, W, 3). Edges are anti-aliased by supersampling, as a camera would blur them."""
    n, ss = spec.size, supersample
    grid = (np.arange(n * ss, dtype=np.float32) + 0.5) / ss
    xs, ys = np.meshgrid(grid, grid)
    out = np.empty((spec.frames, n, n, 3), dtype=np.uint8)
    bg = np.asarray(spec.background, dtype=np.float32)
    for t in range(spec.frames):
        frame = np.broadcast_to(bg, (n, n, 3)).copy()
        for obj in spec.objects:  # later objects are drawn on top
            cx, cy = obj.centre(t)
            mask = _coverage(obj.shape, xs, ys, cx, cy, obj.radius)
            alpha = mask.reshape(n, ss, n, ss).mean(axis=(1, 3))[..., None]
            colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
            frame = frame * (1 - alpha) + colour * alpha
        out[t] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return out


def allowed_combos(exclude: Iterable[str] = (), only: Iterable[str] = ()) -> list[Combo]:
    only_set = {Combo.parse(c) for c in only}
    excluded = {Combo.parse(c) for c in exclude}
    pool = sorted(only_set, key=str) if only_set else all_combos()
    allowed = [c for c in pool if c not in excluded]
    if not allowed:
        raise ValueError("no colour/shape/motion combination left after exclude/only")
    return allowed


def generate_samples(num: int, *, seed: int, frames: int, size: int, fps: float = 8.0,
                     exclude: Iterable[str] = (), only: Iterable[str] = (),
                     two_object_prob: float = 0.0, crf: int = 18, start: int = 0,
                     travel: tuple[float, float] = TRAVEL, radius: tuple[float, float] = RADIUS,
                     alt_captions: bool = False) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {"mp4": bytes, "txt": bytes, "json": bytes}) for clips start..start+num-1;
    with `alt_captions` the json lists the clip's shorter captions (`captions`)."""
    allowed = allowed_combos(exclude, only)
    for i in range(start, start + num):
        spec = clip_spec(i, seed=seed, frames=frames, size=size, fps=fps, allowed=allowed,
                         two_object_prob=two_object_prob, travel=travel, radius=radius)
        frames_u8 = render_clip(spec)
        meta = spec.meta() | {"caption": spec.caption, "seed": seed, "index": i}
        if alt_captions:
            meta["captions"] = spec.alternative_captions
        yield spec.key, {
            "mp4": encode_mp4(frames_u8, fps=fps, crf=crf),
            "txt": spec.caption.encode(),
            "json": json.dumps(meta).encode(),
        }


def run_synth(cfg: SynthConfig) -> dict:
    """`t2v data synth`: `cfg.num` clips as raw shards at `cfg.out` (+ resolved config, index)."""
    t0 = time.time()
    save_resolved(cfg, storage.join(cfg.out, "synth_config.yaml"))
    writer = ShardWriter(cfg.out, shard_size=cfg.shard_size,
                         extra_index={"source": "synthetic", "seed": cfg.seed})
    samples = generate_samples(cfg.num, seed=cfg.seed, frames=cfg.frames, size=cfg.size,
                               fps=cfg.fps, exclude=cfg.exclude, only=cfg.only,
                               two_object_prob=cfg.two_object_prob, crf=cfg.crf,
                               travel=tuple(cfg.travel), radius=tuple(cfg.radius),
                               alt_captions=cfg.alt_captions)
    for i, (key, fields) in enumerate(samples, 1):
        writer.write(key, fields)
        if i % cfg.shard_size == 0 or i == cfg.num:
            rate = i / max(time.time() - t0, 1e-9)
            print(f"[synth] {i}/{cfg.num} clips ({rate:.0f}/s) -> {cfg.out}", flush=True)
    index = writer.close()
    return {"out": cfg.out, "samples": index["total"], "shards": len(index["shards"]),
            "seconds": round(time.time() - t0, 2)}
