"""VideoDiT -> diffusers `WanTransformer3DModel`: config, weight names and LoRA adapter names.

The inverse of t2v/models/wan.py (same rename tables, read the other way): what `t2v export
--diffusers` writes. Fused VideoDiT projections split back into Wan's separate ones (self-
attention qkv -> to_q, to_k, to_v; cross-attention kv -> to_k, to_v), so
`convert_wan_state_dict(dit_to_wan_state_dict(sd)) == sd` bit for bit.

A fused LoRA adapter (A shared by q, k and v, B stacked) splits exactly: the update of to_q is
B_q @ A, with B_q the rows of B that produce q. diffusers loads peft-format adapters with
alpha = rank (scale 1) when the file holds no alphas, so the package's alpha / rank is folded
into B: `pipe.load_lora_weights` then applies the same update as our merge.

Pure torch + json: no diffusers import.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from torch import Tensor

from t2v.models.dit import DiTConfig
from t2v.models.wan import BLOCK_FUSED, BLOCK_RENAMES, TOP_RENAMES

TRANSFORMER_CLASS = "WanTransformer3DModel"
ROPE_MAX_SEQ_LEN = 1024
"""Wan 2.1's: diffusers precomputes RoPE for grid sides up to this (VideoDiT has no limit)."""
LORA_PREFIX = "transformer."
"""diffusers' LoRA files name the pipeline component first (`transformer.blocks.0...`)."""

_TOP = {ours: wan for wan, ours in TOP_RENAMES.items()}
_BLOCK = {ours: wan for wan, ours in BLOCK_RENAMES.items()}
_BLOCK_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")


def wan_transformer_config(cfg: DiTConfig) -> dict:
    """The config.json of a `WanTransformer3DModel` equal to a VideoDiT of config `cfg`.

    ValueError (naming the field) for what diffusers' Wan transformer cannot express.
    """
    if not cfg.qk_norm:
        raise ValueError("qk_norm=False: diffusers' Wan transformer always normalises queries "
                         "and keys")
    if cfg.rope_theta != 10000.0:
        raise ValueError(f"rope_theta={cfg.rope_theta}: diffusers' Wan RoPE is fixed at 10000")
    if cfg.output_channels != cfg.in_channels:
        raise ValueError(f"out_channels={cfg.out_channels} != in_channels={cfg.in_channels}: "
                         "not a text-to-video Wan transformer")
    return {
        "_class_name": TRANSFORMER_CLASS,
        "patch_size": list(cfg.patch),
        "num_attention_heads": cfg.heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.depth,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": ROPE_MAX_SEQ_LEN,
        "pos_embed_seq_len": None,
    }


def wan_layers(layer: str) -> tuple[str, ...]:
    """The diffusers module(s) of a VideoDiT module: one name, or, for a fused projection, the
    modules its output rows split into, in order (`blocks.0.self_attn.qkv` -> to_q, to_k, to_v).
    """
    if layer in _TOP:
        return (_TOP[layer],)
    m = _BLOCK_LAYER.fullmatch(layer)
    if m is not None:
        block, rest = f"blocks.{m[1]}", m[2]
        if rest in _BLOCK:
            return (f"{block}.{_BLOCK[rest]}",)
        if rest in BLOCK_FUSED:
            return tuple(f"{block}.{part}" for part in BLOCK_FUSED[rest])
    raise ValueError(f"VideoDiT layer {layer!r} has no diffusers Wan counterpart")


def wan_tensors(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """One VideoDiT weight -> its diffusers name(s) and tensor(s); fused weights are split by
    output rows, each part its own storage (safetensors refuses tensors that share one)."""
    layer, leaf = key.rsplit(".", 1)
    if leaf == "modulation":  # the learned adaLN offsets: Wan's scale_shift_table
        return [("scale_shift_table" if layer == "head" else f"{layer}.scale_shift_table",
                 tensor)]
    names = wan_layers(layer)
    if len(names) == 1:
        return [(f"{names[0]}.{leaf}", tensor)]
    parts = tensor.chunk(len(names))  # (n * dim, ...) -> n x (dim, ...)
    return [(f"{n}.{leaf}", p.clone()) for n, p in zip(names, parts, strict=True)]


def dit_to_wan_state_dict(sd: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Every VideoDiT weight of `sd` under diffusers Wan names, one source tensor at a time (a
    lazily read Mapping, e.g. a safetensors file, never sits in memory whole)."""
    for key in sd:
        yield from wan_tensors(key, sd[key])


def lora_to_diffusers(lora: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """VideoDiT LoRA adapters (`X.lora_A.weight`, `X.lora_B.weight`) -> a diffusers/peft LoRA
    state dict for `pipe.load_lora_weights` (`transformer.<wan module>.lora_A.weight`), with
    `scale` (alpha / rank) folded into B; dtypes kept.

    ValueError for unpaired adapters or a layer without a Wan counterpart.
    """
    layers = sorted({k.rsplit(".", 2)[0] for k in lora})
    out: dict[str, Tensor] = {}
    for layer in layers:
        a, b = lora.get(f"{layer}.lora_A.weight"), lora.get(f"{layer}.lora_B.weight")
        if a is None or b is None or len(lora) != 2 * len(layers):
            raise ValueError(f"LoRA layer {layer}: needs exactly lora_A.weight and "
                             "lora_B.weight")
        names = wan_layers(layer)
        b_scaled = (b.float() * scale).to(b.dtype)  # (n * out, r)
        for name, b_part in zip(names, b_scaled.chunk(len(names)), strict=True):
            out[f"{LORA_PREFIX}{name}.lora_A.weight"] = a.clone()  # (r, in)
            out[f"{LORA_PREFIX}{name}.lora_B.weight"] = b_part.clone()  # (out, r)
    return out
