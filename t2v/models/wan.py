"""Load diffusers-format Wan 2.1 T2V transformers (`WanTransformer3DModel`) into a VideoDiT.

Pure torch + safetensors + json: no diffusers import. Only text-to-video checkpoints are
accepted: image-conditioned variants (CLIP image tokens, FLF2V position embeddings, channel-
concatenated I2V) have inputs that VideoDiT does not take, and are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from t2v.models.dit import DiTConfig, VideoDiT

# diffusers config keys that VideoDiT reads (all others but "_..." metadata are refused).
_KNOWN_KEYS = {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "image_dim", "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
}
# Set only in image-conditioned Wan variants.
_NON_T2V_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")


def wan_config_to_dit(config: dict) -> DiTConfig:
    """DiTConfig from a diffusers `WanTransformer3DModel` config.json dict.

    `rope_max_seq_len` is dropped: VideoDiT computes RoPE for any grid size, and matches
    diffusers wherever diffusers works (grid sides <= rope_max_seq_len). The geometry only:
    `text_mask` keeps its default, and `t2v import` sets it False for WanPipeline's convention.
    """
    name = config.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise ValueError(f"_class_name={name!r}: only WanTransformer3DModel (T2V) is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown WanTransformer3DModel config keys: {unknown}")
    for key in _NON_T2V_KEYS:
        if config.get(key) is not None:
            raise ValueError(f"{key}={config[key]!r}: an image-conditioned Wan model, not T2V")
    in_ch = config.get("in_channels", 16)
    out_ch = config.get("out_channels") or in_ch
    if out_ch != in_ch:
        raise ValueError(f"in_channels={in_ch} != out_channels={out_ch}: image-to-video "
                         "(conditioning channels concatenated), not T2V")
    # diffusers builds and applies the across-heads RMSNorm whatever this field says (None too).
    qk_norm = config.get("qk_norm", "rms_norm_across_heads")
    if qk_norm not in ("rms_norm_across_heads", None):
        raise ValueError(f"qk_norm={qk_norm!r}: only 'rms_norm_across_heads' is supported")
    heads = config.get("num_attention_heads", 40)
    return DiTConfig(
        in_channels=in_ch,
        out_channels=None,  # == in_channels, checked above
        patch=tuple(config.get("patch_size", (1, 2, 2))),
        dim=heads * config.get("attention_head_dim", 128),
        ffn_dim=config.get("ffn_dim", 13824),
        heads=heads,
        depth=config.get("num_layers", 40),
        text_dim=config.get("text_dim", 4096),
        freq_dim=config.get("freq_dim", 256),
        qk_norm=True,
        cross_attn_norm=bool(config.get("cross_attn_norm", True)),
        eps=float(config.get("eps", 1e-6)),
    )


# One-to-one renames, diffusers -> VideoDiT ("{}" is a block index in BLOCK_RENAMES).
TOP_RENAMES = {
    "patch_embedding": "patch_embed",
    "condition_embedder.text_embedder.linear_1": "text_embed.fc1",
    "condition_embedder.text_embedder.linear_2": "text_embed.fc2",
    "condition_embedder.time_embedder.linear_1": "time_embed.fc1",
    "condition_embedder.time_embedder.linear_2": "time_embed.fc2",
    "condition_embedder.time_proj": "time_proj",
    "proj_out": "head.linear",
}
BLOCK_RENAMES = {
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn1.to_out.0": "self_attn.out",
    "attn2.to_q": "cross_attn.q",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.to_out.0": "cross_attn.out",
    "norm2": "cross_norm",
    "ffn.net.0.proj": "ffn.fc1",
    "ffn.net.2": "ffn.fc2",
}
# Separate diffusers projections that VideoDiT stores as one fused Linear.
BLOCK_FUSED = {
    "self_attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv": ("attn2.to_k", "attn2.to_v"),
}


def convert_wan_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a diffusers Wan state dict to VideoDiT names; every key must be consumed.

    Raises ValueError listing leftover keys (an unsupported variant) or missing ones.
    """
    left = dict(sd)
    out: dict[str, Tensor] = {}
    missing: list[str] = []

    def take(src: str, dst: str) -> None:
        if src in left:
            out[dst] = left.pop(src)
        else:
            missing.append(src)

    for src, dst in TOP_RENAMES.items():
        for p in ("weight", "bias"):
            take(f"{src}.{p}", f"{dst}.{p}")
    take("scale_shift_table", "head.modulation")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        take(f"{b}.scale_shift_table", f"{b}.modulation")
        for src, dst in BLOCK_RENAMES.items():
            if src == "norm2" and f"{b}.norm2.weight" not in sd:
                continue  # cross_attn_norm=False: no affine norm before cross-attention
            params = ("weight",) if src.endswith(("norm_q", "norm_k")) else ("weight", "bias")
            for p in params:  # the QK RMSNorms have no bias
                take(f"{b}.{src}.{p}", f"{b}.{dst}.{p}")
        for dst, parts in BLOCK_FUSED.items():
            for p in ("weight", "bias"):
                keys = [f"{b}.{s}.{p}" for s in parts]
                absent = [k for k in keys if k not in left]
                if absent:
                    missing.extend(absent)
                else:
                    out[f"{b}.{dst}.{p}"] = torch.cat([left.pop(k) for k in keys])
    if left or missing:
        raise ValueError(f"Wan state dict does not match VideoDiT: leftover keys "
                         f"{sorted(left)}, missing keys {sorted(missing)}")
    return out


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a diffusers model folder: single file, sharded index, or any *.safetensors."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "diffusion_pytorch_model.safetensors").exists():
        files = ["diffusion_pytorch_model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    sd: dict[str, Tensor] = {}
    for name in files:
        sd.update(load_file(str(folder / name)))
    return sd


def load_wan_transformer(folder: str | Path, dtype: torch.dtype | None = None) -> VideoDiT:
    """A VideoDiT holding the weights of a diffusers `WanTransformer3DModel` folder.

    Reads `config.json` and the safetensors weights (never pickles), builds the model on the meta
    device and assigns the converted tensors; `dtype` casts them (None keeps the file's dtype).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ValueError(f"no config.json in {folder}")
    cfg = wan_config_to_dit(json.loads(config_path.read_text()))
    sd = convert_wan_state_dict(_read_weights(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = VideoDiT(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model
