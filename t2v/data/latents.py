"""Ray Data reader of latent shards (written by `t2v encode`) for training.

Rows stay numpy float16/uint8 through Ray's object store (half the bytes of float32); the collate
function makes the float32/bool tensors the DiT trains on, at the consumer. Nothing is decoded
but `.npy` members (np.load without pickle), so reading is cheap next to the raw-video reader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from t2v import storage
from t2v.data.shards import INDEX_NAME, read_index, shard_uris

LATENT_FORMAT = "t2v-latents-v1"
# Shard member suffix -> row column. The json member stays in the tar (provenance), unread here.
COLUMNS = {"latent.npy": "latent", "text.npy": "text", "mask.npy": "mask", "txt": "caption",
           "__key__": "key"}


def latent_stream(uri: str | list[str], shuffle_seed: int | None = None) -> ray.data.Dataset:
    """Rows {latent (C,T',H',W') f16, text (L,D) f16, mask (L,) u8, caption, key}; lazy.

    `uri` is a latent data set's root, or a list of its shard URIs (training keeps its held-out
    shard out this way). With a `shuffle_seed`, each pass (epoch) reads the shard files in a new
    order derived from it; None keeps the order.
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
    fs, paths = storage.pyarrow_paths(uris)
    shuffle = None
    if shuffle_seed is not None:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True)
    ds = ray.data.read_webdataset(paths, filesystem=fs, shuffle=shuffle,
                                  suffixes=[s for s in COLUMNS if not s.startswith("__")])
    return ds.select_columns(list(COLUMNS)).rename_columns(COLUMNS)


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
