"""Ray Data reader of latent shards (written by `t2v encode`) for training.

Rows stay numpy float16/uint8 through Ray's object store (half the bytes of float32); the collate
function makes the float32/bool tensors the DiT trains on, at the consumer. Nothing is decoded
but `.npy` members (np.load without pickle), so reading is cheap next to the raw-video reader.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from t2v import storage
from t2v.data.shards import INDEX_NAME, read_index, shard_uris
from t2v.data.tarsource import tar_dataset

LATENT_FORMAT = "t2v-latents-v1"
MEMBERS = ("latent.npy", "text.npy", "mask.npy", "txt")
"""The members of a sample read for training; the json member stays in the tar (provenance)."""


def latent_stream(uri: str | list[str], shuffle_seed: int | None = None,
                  clock=None) -> ray.data.Dataset:  # noqa: ANN001 - a PassClock handle
    """Rows {latent (C,T',H',W') f16, text (L,D) f16, mask (L,) u8, caption, key}; lazy.

    `uri` is a latent data set's root, or a list of its shard URIs (training keeps its held-out
    shard out this way). With a `shuffle_seed`, each pass reads the shard files in the order
    `pass_order(seed, pass)`, the pass being `clock`'s (training's) or 0; None keeps the order.
    """
    if isinstance(uri, str):
        if storage.exists(storage.join(uri, INDEX_NAME)):
            fmt = read_index(uri).get("format")
            if fmt != LATENT_FORMAT:
                raise ValueError(f"{uri}: format {fmt!r} is not latent shards ({LATENT_FORMAT}); "
                                 "run `t2v encode` on raw shards first")
        uris = shard_uris(uri)
    else:
        uris = list(uri)
    if not uris:
        raise storage.StorageError(f"{uri}: no latent shard-*.tar found")
    # Members are decoded by us (decode_latent_row), not by the reader: a damaged .npy is one
    # skipped sample naming its shard, not a failed read task that ends the run; a damaged
    # shard is one line naming it (t2v/data/tarsource.py).
    ds = tar_dataset(uris, MEMBERS, seed=shuffle_seed, clock=clock)
    return ds.flat_map(decode_latent_row)


NDIM = {"latent": 4, "text": 2, "mask": 1}
"""Dimensions of each array member: latent (C, T', H', W'), text (L, D), mask (L,)."""


def _array(data: object, column: str) -> np.ndarray:
    if not isinstance(data, bytes | bytearray) or not data:
        raise ValueError(f"{column}: missing member")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != NDIM[column]:
        raise ValueError(f"{column}: {array.ndim}-D array, expected {NDIM[column]}-D")
    if column != "mask" and not np.isfinite(array).all():
        raise ValueError(f"{column}: non-finite values")
    return array


def decode_latent_row(row: dict) -> list[dict]:
    """A row of raw tar members -> [the training row], or [] for a damaged sample, reported
    with its shard and key on the log (the pass check counts it as missing). Runs inside Ray
    Data's read tasks."""
    key = _text(row.get("__key__"))
    try:
        out = {column: _array(row.get(f"{column}.npy"), column) for column in NDIM}
        caption = row.get("txt")
        out["caption"] = (bytes(caption).decode("utf-8") if isinstance(caption, bytes | bytearray)
                          else _text(caption))
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:  # np.load's failures
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"[t2v] skipped a damaged latent sample {_text(row.get('__url__'))}:{key}: "
              f"{reason}", flush=True)
        return []
    out["key"] = key
    return [out]


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)


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
    """numpy batch -> LatentBatch, for `Dataset.iter_torch_batches(collate_fn=LatentCollate())`."""

    def __call__(self, batch: dict[str, np.ndarray]) -> LatentBatch:
        return LatentBatch(
            latent=_stack(batch, "latent").float(),  # (B, C, T', H', W')
            text=_stack(batch, "text").float(),  # (B, L, D)
            mask=_stack(batch, "mask").bool(),  # (B, L)
            captions=[str(c) for c in batch["caption"]],
            keys=[str(k) for k in batch["key"]],
        )
