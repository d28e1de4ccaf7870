"""numpy batches from Ray Data -> the tensor batches training takes, at the consumer.

Everything that reads or decodes data (t2v/data/video.py, shards.py, tarsource.py, latents.py,
the read-task side of streaming.py) stays torch-free: Ray Data runs it in fresh worker
processes, and its split coordinator and Ray Train's dataset manager unpickle it too; torch
would cost each of them ~2 s of a core and ~300 MB. Tensors are made here, in the trainer.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from t2v.data.tensors import to_model_range


class VideoCollate(NumpyBatchCollateFn):
    """numpy batch -> VideoBatch; uint8 (B,T,H,W,3) -> float (B,3,T,H,W) in [-1, 1]."""

    def __call__(self, batch: dict[str, np.ndarray]) -> VideoBatch:
        with warnings.catch_warnings():  # Ray hands out read-only arrays; we only read them
            warnings.simplefilter("ignore", UserWarning)
            video = torch.from_numpy(np.ascontiguousarray(batch["video"]))
        return VideoBatch(
            video=to_model_range(video),  # (B, 3, T, H, W)
            captions=[str(c) for c in batch["caption"]],
            keys=[str(k) for k in batch["key"]],
            meta=[json.loads(m) for m in batch["meta"]],
        )


@dataclass
class VideoBatch:
    video: torch.Tensor
    """(B, 3, T, H, W) float32 in [-1, 1], the models' layout."""
    captions: list[str]
    keys: list[str]
    meta: list[dict]


@dataclass
class LatentBatch:
    latent: torch.Tensor
    """(B, C, T', H', W') float32, normalised latents."""
    text: torch.Tensor
    """(B, L, D) float32 caption embeddings, zero at padded positions."""
    mask: torch.Tensor
    """(B, L) bool, True at real tokens."""
    captions: list[str]
    keys: list[str]
    alt_text: torch.Tensor | None = None
    """(B, K, L, D) float32: each sample's alternative captions (latent shards' text_alt), K the
    most any sample of the batch has; None when none has any."""
    alt_mask: torch.Tensor | None = None
    """(B, K, L) bool; all False for the alternatives a sample does not have."""


def _stack_alternatives(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """text_alt / mask_alt of the rows, padded to the batch's most alternatives (K); None if
    no row has one (or the rows carry no such columns)."""
    if "text_alt" not in batch:
        return None
    texts, masks = list(batch["text_alt"]), list(batch["mask_alt"])
    k = max(len(t) for t in texts)
    if k == 0:
        return None
    shape = texts[0].shape[1:]
    text = np.zeros((len(texts), k, *shape), np.float32)
    mask = np.zeros((len(texts), k, shape[0]), bool)
    for i, (t, m) in enumerate(zip(texts, masks, strict=True)):
        text[i, :len(t)], mask[i, :len(m)] = t, m
    return text, mask


def _stack(batch: dict[str, np.ndarray], column: str) -> torch.Tensor:
    values = batch[column]
    if values.dtype == object:  # Ray hands ragged tensors over as an object array
        shapes = sorted({tuple(v.shape) for v in values})
        if len(shapes) > 1:
            raise ValueError(f"{column}: a batch mixes shapes {shapes}; batch latents of one "
                             "clip size (encode with frames= and size=)")
        values = np.stack(list(values))
    with warnings.catch_warnings():  # Ray hands out read-only arrays; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(values))


class LatentCollate(NumpyBatchCollateFn):
    """numpy batch -> LatentBatch, for `Dataset.iter_torch_batches(collate_fn=LatentCollate())`.

    `text_length` L pads text (B, W, D) and mask (B, W) that the reader trimmed to W
    (`latent_stream(text_tokens=W)`) back to L with zeros / False: the stored values exactly, so
    a model that attends to padding (Wan's, text_mask False) sees what it always saw.
    """

    def __init__(self, text_length: int | None = None) -> None:
        self.text_length = text_length

    def __call__(self, batch: dict[str, np.ndarray]) -> LatentBatch:
        text, mask = _stack(batch, "text").float(), _stack(batch, "mask").bool()  # (B, W, ..)
        alt = _stack_alternatives(batch)
        alt_text, alt_mask = (None, None) if alt is None else map(torch.from_numpy, alt)
        pad = (self.text_length or 0) - text.shape[1]
        if pad > 0:
            text = torch.nn.functional.pad(text, (0, 0, 0, pad))  # (B, L, D)
            mask = torch.nn.functional.pad(mask, (0, pad))  # (B, L)
            if alt_text is not None:
                alt_text = torch.nn.functional.pad(alt_text, (0, 0, 0, pad))  # (B, K, L, D)
                alt_mask = torch.nn.functional.pad(alt_mask, (0, pad))  # (B, K, L)
        return LatentBatch(
            latent=_stack(batch, "latent").float(),  # (B, C, T', H', W')
            text=text, mask=mask,
            captions=[str(c) for c in batch["caption"]],
            keys=[str(k) for k in batch["key"]],
            alt_text=alt_text, alt_mask=alt_mask,
        )
