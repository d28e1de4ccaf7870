"""Ray Data reader of latent shards (written by `t2v encode`) for training.

Rows stay numpy float16/uint8 through Ray's object store (half the bytes of float32); the collate
function (t2v/data/collate.py) makes the float32/bool tensors the DiT trains on, at the consumer.
Nothing is decoded but `.npy` members (np.load without pickle), so reading is cheap next to the
raw-video reader. No torch here: the read tasks, Ray Data's split coordinator and Ray Train's
dataset manager load this module in fresh processes.
"""

from __future__ import annotations

import io
from functools import partial

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockAccessor

from t2v import storage
from t2v.data.shards import INDEX_NAME, read_index, shard_uris
from t2v.data.tarsource import tar_dataset

LATENT_FORMAT = "t2v-latents-v1"
MEMBERS = ("latent.npy", "text.npy", "mask.npy", "txt")
"""The members of a sample read for training; the json member stays in the tar (provenance)."""
ALT_MEMBERS = ("text_alt.npy", "mask_alt.npy")
"""Read too when training draws alternative captions (only clips with some have them)."""
EMPTY_CAPTION = "_empty_caption.npz"
"""Beside `_index.json`: the text encoder's output for the empty caption, float32 `text` (L, D)
and bool `mask` (L,), the input a dropped caption gets in training. Encode's actors write it
(they hold the encoder), so a DiT training driver on latents needs no text encoder (umT5-xxl is
~11 GB); the index names it. Data sets encoded before it was written have none."""


def empty_caption_bytes(text: np.ndarray, mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, text=text.astype(np.float32), mask=mask.astype(bool))
    return buf.getvalue()


def read_empty_caption(root: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(text (L, D) float32, mask (L,) bool) for the empty caption of the latent data set at
    `root`, or None when its index names none."""
    name = read_index(root).get("empty_caption")
    if not name:
        return None
    with np.load(io.BytesIO(storage.read_bytes(storage.join(root, name))),
                 allow_pickle=False) as f:
        return f["text"], f["mask"]


def latent_stream(uri: str | list[str], shuffle_seed: int | None = None,
                  clock=None,  # noqa: ANN001 - a PassClock handle
                  text_tokens: int | None = None,
                  alternatives: bool = False) -> ray.data.Dataset:
    """Rows {latent (C,T',H',W') f16, text (W,D) f16, mask (W,) u8, text_alt (K,W,D) f16,
    mask_alt (K,W) u8, caption, key}; lazy. K: the sample's alternative captions (0: none, and
    always 0 unless `alternatives`: a run that does not draw them does not move their bytes).

    `uri` is a latent data set's root, or a list of its shard URIs (training keeps its held-out
    shard out this way). With a `shuffle_seed`, each pass reads the shard files in the order
    `pass_order(seed, pass)`, the pass being `clock`'s (training's) or 0; None keeps the order.

    W is `text_tokens` (a root's index gives it: the longest caption's tokens, recorded by
    encode), else the stored L: the positions past it are padding in every sample, so rows
    leave them out (the demo's 9-token captions padded to 64 were 49 of a sample's 55 KB that
    Ray's object store moved) and `LatentCollate(text_length=L)` puts the zeros back.
    """
    if isinstance(uri, str):
        if storage.exists(storage.join(uri, INDEX_NAME)):
            index = read_index(uri)
            if index.get("format") != LATENT_FORMAT:
                raise ValueError(f"{uri}: format {index.get('format')!r} is not latent shards "
                                 f"({LATENT_FORMAT}); run `t2v encode` on raw shards first")
            text_tokens = text_tokens or index.get("text_tokens")
        uris = shard_uris(uri)
    else:
        uris = list(uri)
    if not uris:
        raise storage.StorageError(f"{uri}: no latent shard-*.tar found")
    # Members are decoded by us in the read task (decode_latent_rows): a damaged .npy is one
    # skipped sample naming its shard, not a failed read task that ends the run; a damaged
    # shard is one line naming it (t2v/data/tarsource.py).
    decode = partial(decode_latent_rows, text_tokens=text_tokens or None)
    members = MEMBERS + ALT_MEMBERS if alternatives else MEMBERS
    return tar_dataset(uris, members, seed=shuffle_seed, clock=clock, decode=decode)


NDIM = {"latent": 4, "text": 2, "mask": 1}
"""Dimensions of each array member: latent (C, T', H', W'), text (L, D), mask (L,)."""
ALT_NDIM = {"text_alt": 3, "mask_alt": 2}
"""The optional alternative captions: text_alt (K, L, D), mask_alt (K, L)."""
COLUMNS = (*NDIM, *ALT_NDIM)


_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}
"""Parsed .npy headers by their bytes: a data set's samples share a handful of headers, and
numpy parses each with `ast` (~30 us), more than reading the array."""


def _npy(data: bytes) -> np.ndarray:
    """np.load(allow_pickle=False) of .npy bytes, without a copy and with its header parsed
    once per distinct header: a read-only view of `data`."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy array")
    head = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else \
        12 + int.from_bytes(data[8:12], "little")
    parsed = _HEADERS.get(data[:head])
    if parsed is None:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names): numpy's own reader
            return np.load(io.BytesIO(data), allow_pickle=False)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("an object array (pickled); not loaded")
        parsed = (dtype, shape, fortran, f.tell())
        if len(_HEADERS) < 1024:
            _HEADERS[data[:head]] = parsed
    dtype, shape, fortran, offset = parsed
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for a {dtype} array of shape {shape}")
    array = np.frombuffer(data, dtype, count, offset)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _array(data: object, column: str) -> np.ndarray:
    if not isinstance(data, bytes | bytearray) or not data:
        raise ValueError(f"{column}: missing member")
    try:
        array = _npy(bytes(data))
    except ValueError as e:
        raise ValueError(f"{column}: {e}") from None
    ndim = (NDIM | ALT_NDIM)[column]
    if array.ndim != ndim:
        raise ValueError(f"{column}: {array.ndim}-D array, expected {ndim}-D")
    if not column.startswith("mask") and not np.isfinite(array).all():
        raise ValueError(f"{column}: non-finite values")
    return array


def decode_latent_row(row: dict, text_tokens: int | None = None) -> list[dict]:
    """A row of raw tar members -> [the training row], or [] for a damaged sample, reported
    with its shard and key on the log (the pass check counts it as missing). Runs inside Ray
    Data's read tasks. With `text_tokens`, text and mask keep their first that many positions
    (a view: the rest is padding; a sample with a token past them is damaged)."""
    key = _text(row.get("__key__"))
    try:
        out = {column: _array(row.get(f"{column}.npy"), column) for column in NDIM}
        out |= _alternatives(row, out["text"])
        if text_tokens and len(out["mask"]) > text_tokens:
            if out["mask"][text_tokens:].any() or out["mask_alt"][:, text_tokens:].any():
                raise ValueError(f"mask: a token past the index's text_tokens={text_tokens}")
            for c in ("text", "mask"):
                out[c], out[c + "_alt"] = out[c][:text_tokens], out[c + "_alt"][:, :text_tokens]
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


def _alternatives(row: dict, text: np.ndarray) -> dict[str, np.ndarray]:
    """text_alt (K, L, D) and mask_alt (K, L) of a row; K = 0 where the sample has none."""
    if row.get("text_alt.npy") is None and row.get("mask_alt.npy") is None:
        return {"text_alt": np.zeros((0, *text.shape), text.dtype),
                "mask_alt": np.zeros((0, text.shape[0]), np.uint8)}
    alt = {c: _array(row.get(f"{c}.npy"), c) for c in ALT_NDIM}
    if alt["text_alt"].shape[1:] != text.shape or alt["mask_alt"].shape != alt["text_alt"].shape[:2]:
        raise ValueError(f"text_alt: shape {alt['text_alt'].shape} / mask_alt "
                         f"{alt['mask_alt'].shape} do not fit text {text.shape}")
    return alt


def decode_latent_rows(rows: list[dict], text_tokens: int | None = None) -> list[pa.Table]:
    """A read task's rows of raw members -> training blocks (`decode_latent_row` each, damaged
    samples skipped), one block per array geometry in the order first seen (a bucketed data set
    mixes latent shapes in a shard; a block of one shape is stacked arrays, no ragged column)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        for out in decode_latent_row(row, text_tokens):
            groups.setdefault(tuple(out[c].shape for c in COLUMNS), []).append(out)
    return [BlockAccessor.batch_to_block(
        {**{c: np.stack([r[c] for r in group]) for c in COLUMNS},
         "caption": np.array([r["caption"] for r in group], dtype=object),
         "key": np.array([r["key"] for r in group], dtype=object)})
        for group in groups.values()]


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return "" if value is None else str(value)
