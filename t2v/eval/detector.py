"""A shapes-video detector: predicts each object's colour, shape and motion from pixels alone.

It never sees the prompt. The evaluation (t2v/eval/scoring.py) compares its predictions with the
ground truth the prompt file carries in each row's `meta`.

How it reads a clip (uint8 (T, H, W, 3), any size):
1. Background per frame = the per-channel median of the 1-pixel border (objects stay inside).
2. Every pixel is explained as a mix of the background b and one palette colour c:
   p ~ b + alpha (c - b). For each colour the best alpha in [0, 1] and the residual
   |p - b - alpha (c - b)| are computed; the colour with the smallest residual wins the pixel,
   with weight alpha. Anti-aliased edges (a half-covered cyan pixel looks dark teal) are thus
   still cyan, where a nearest-colour rule would call them blue.
3. Objects = palette colours whose total weight is a sizeable share of the largest one.
4. Shape: per frame, the colour's soft mask is compared (soft IoU) with a circle, a square and a
   triangle of the same area drawn at the same centroid, with the generator's own geometry; the
   best mean IoU over frames wins.
5. Motion: a least-squares line through the per-frame centroids; a total displacement under
   `still_fraction` of the frame side is "still", otherwise the dominant axis and sign.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from t2v.data.synthetic import COLOURS, SHAPES, _coverage

PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)

# Area of each shape per radius^2, from the generator's geometry (synthetic._coverage):
# circle pi r^2; square side 1.8 r; triangle height 1.6 r, base 2 * 1.05 r.
_AREA_PER_R2 = {"circle": np.pi, "square": 1.8**2, "triangle": 0.5 * 1.6 * 2 * 1.05}
# The triangle's centroid lies 1/3 of its height above its base: cy + 0.6 r - 1.6 r / 3.
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 0.6 - 1.6 / 3}


@dataclass
class DetectedObject:
    colour: str
    shape: str
    motion: str
    area: float
    """Mean soft area per frame, in pixels."""
    displacement: tuple[float, float]
    """Fitted (dx, dy) from the first to the last frame, pixels (y grows downwards)."""
    shape_iou: dict[str, float] = field(default_factory=dict)
    """Mean soft IoU with each shape template (the prediction is the best)."""


@dataclass
class Detection:
    objects: list[DetectedObject]
    """Largest first; empty when nothing but background was found."""

    @property
    def count(self) -> int:
        return len(self.objects)

    def main(self, colour: str | None = None) -> DetectedObject | None:
        """The object of `colour` if one was found, else the largest (None: nothing found)."""
        for obj in self.objects:
            if obj.colour == colour:
                return obj
        return self.objects[0] if self.objects else None

    def to_dict(self) -> dict:
        return {"count": self.count, "objects": [asdict(o) for o in self.objects]}


def background(frames: np.ndarray) -> np.ndarray:
    """(T, 3) per-frame background colour: the median of each frame's border pixels."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, 1:-1, 0],
                             frames[:, 1:-1, -1]], axis=1)  # (T, 2W + 2H - 4, 3)
    return np.median(border, axis=1)  # (T, 3)


def colour_weights(frames: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the winning palette index (T, H, W) and its coverage alpha in [0, 1]."""
    d = frames[..., None, :] - bg[:, None, None, None, :]  # (T, H, W, 1, 3): pixel - background
    v = PALETTE[None, None, None] - bg[:, None, None, None, :]  # (T, 1, 1, K, 3): colour - bg
    vv = np.maximum((v * v).sum(-1), 1e-6)  # (T, 1, 1, K)
    alpha = np.clip((d * v).sum(-1) / vv, 0.0, 1.0)  # (T, H, W, K)
    resid = np.linalg.norm(d - alpha[..., None] * v, axis=-1)  # (T, H, W, K)
    best = resid.argmin(-1)  # (T, H, W)
    return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (T, H, W) x2


def _template(shape: str, area: float, cx: float, cy: float, h: int, w: int,
              supersample: int = 4) -> np.ndarray:
    """Soft (H, W) mask of `shape` with this area whose centroid is (cx, cy) (pixel units)."""
    r = float(np.sqrt(area / _AREA_PER_R2[shape]))
    ys = (np.arange(h * supersample, dtype=np.float32) + 0.5) / supersample
    xs = (np.arange(w * supersample, dtype=np.float32) + 0.5) / supersample
    gx, gy = np.meshgrid(xs, ys)
    mask = _coverage(shape, gx, gy, cx, cy - _CENTROID_DY[shape] * r, r)
    return mask.reshape(h, supersample, w, supersample).mean(axis=(1, 3))  # (H, W)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def classify_motion(displacement: tuple[float, float], size: int,
                    still_fraction: float = 0.15) -> str:
    dx, dy = displacement
    if np.hypot(dx, dy) < still_fraction * size:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _describe(mask: np.ndarray, colour: str, still_fraction: float) -> DetectedObject | None:
    """Shape and motion of one colour's soft masks (T, H, W)."""
    t, h, w = mask.shape
    areas = mask.sum(axis=(1, 2))  # (T,)
    min_area = 0.002 * h * w
    keep = np.flatnonzero(areas > max(min_area, 0.25 * areas.max()))
    if keep.size == 0:
        return None
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx = (mask[keep] * xs).sum(axis=(1, 2)) / areas[keep]  # (K,)
    cy = (mask[keep] * ys).sum(axis=(1, 2)) / areas[keep]  # (K,)
    if keep.size >= 2:  # least-squares velocity through the centroids, over the whole clip
        vx, vy = np.polyfit(keep, cx, 1)[0], np.polyfit(keep, cy, 1)[0]
        disp = (float(vx * (t - 1)), float(vy * (t - 1)))
    else:
        disp = (0.0, 0.0)
    ious = {s: float(np.mean([_soft_iou(mask[k], _template(s, areas[k], cx[i], cy[i], h, w))
                              for i, k in enumerate(keep)])) for s in SHAPES}
    return DetectedObject(colour=colour, shape=max(ious, key=ious.get),
                          motion=classify_motion(disp, max(h, w), still_fraction),
                          area=float(areas[keep].mean()), displacement=disp, shape_iou=ious)


def detect(frames: np.ndarray, min_share: float = 0.25, min_area_fraction: float = 0.004,
           still_fraction: float = 0.15) -> Detection:
    """Objects in a uint8 (T, H, W, 3) clip, largest first.

    A colour counts as an object when its mean per-frame weight is at least `min_share` of the
    largest colour's and at least `min_area_fraction` of the frame.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 4:
        raise ValueError(f"expected uint8 (T, H, W, 3) frames of at least 4x4, "
                         f"got shape {frames.shape}")
    x = frames.astype(np.float32)
    t, h, w, _ = x.shape
    best, alpha = colour_weights(x, background(x))
    alpha = np.where(alpha > 0.2, alpha, 0.0)  # (T, H, W): ignore codec noise near background
    weights = np.stack([np.where(best == k, alpha, 0.0) for k in range(len(PALETTE))])  # (K,T,H,W)
    per_frame = weights.sum(axis=(2, 3)).mean(axis=1)  # (K,) mean soft area per frame
    top = per_frame.max()
    found = [k for k in np.argsort(-per_frame)
             if per_frame[k] >= max(min_share * top, min_area_fraction * h * w)]
    objects = [o for k in found
               if (o := _describe(weights[k], PALETTE_NAMES[k], still_fraction)) is not None]
    return Detection(objects=objects)
