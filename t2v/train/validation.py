"""Writing what a validation pass produced (rank 0, EMA weights): sample videos as mp4 + GIF and
a contact sheet under RUN/samples/step_N/, scalars and the sheet in TensorBoard, one log line.

What is validated is the stage's business (t2v/train/vae_task.py, dit_task.py): the held-out data
are a few samples of the data set's LAST shard, which the driver keeps out of training.
"""

from __future__ import annotations

import json

import numpy as np

from t2v import storage
from t2v.console import say
from t2v.data.video import encode_mp4, to_gif, to_png
from t2v.train.monitor import TensorBoard
from t2v.train.task import Validation


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos, in dB (finite for equal ones: MSE >= 1e-10)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def record_validation(run_uri: str, step: int, v: Validation, fps: float) -> dict[str, float]:
    """Write `v` under RUN/samples/step_N/ and to TensorBoard; returns its metrics."""
    folder = storage.join(run_uri, "samples", f"step_{step:06d}")
    for name, frames in v.clips.items():
        storage.write_bytes(storage.join(folder, f"{name}.mp4"), encode_mp4(frames, fps=fps))
        storage.write_bytes(storage.join(folder, f"{name}.gif"), to_gif(frames, fps=fps))
    if v.captions is not None:
        storage.write_text(storage.join(folder, "captions.json"), json.dumps(v.captions))
    tb = TensorBoard(run_uri)
    tb.scalars({f"val/{k}": x for k, x in v.metrics.items()}, step)
    if v.sheet is not None:
        tb.image("val/samples", v.sheet, step)
        storage.write_bytes(storage.join(folder, "sheet.png"), to_png(v.sheet))
    tb.close()
    say(f"[val] step {step}: " + " ".join(f"{k} {x:.4f}" for k, x in v.metrics.items()))
    return dict(v.metrics)
