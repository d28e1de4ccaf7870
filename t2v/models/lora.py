"""Low-rank adapters on a VideoDiT: add them (peft), save them on their own, merge them.

Training wraps the chosen nn.Linear layers with peft's LoRA layers in place
(`peft.inject_adapter_in_model`): the base weights are frozen, the adapters A (r, in) and
B (out, r) train, and B starts at zero so the adapted model starts equal to the base. The
update of a layer is scale * B @ A with scale = alpha / rank (peft's default scaling).

Outside training nothing needs peft: adapters travel as a plain state dict whose keys are the
VideoDiT module names plus `.lora_A.weight` / `.lora_B.weight` (lora.safetensors in a package),
and `merge_lora` folds them into the base weights with one matmul per layer.

Target names are suffixes of VideoDiT module names, matched as peft matches them (the whole name
or its tail after a dot): `qkv`, `q`, `kv`, `out` are the attention projections (self-attention
has one fused qkv; cross-attention q and a fused kv), `ffn.fc1`/`ffn.fc2` the feed-forward.
A fused qkv adapter of rank r shares A across q, k and v, unlike diffusers' separate to_q/to_k/to_v
adapters: an adapter trained elsewhere on those names does not map onto ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from torch import Tensor, nn

from t2v.models.dit import VideoDiT, Whole

DEFAULT_TARGETS = ("qkv", "q", "kv", "out")
"""Every attention projection, self and cross (Wan's to_q/to_k/to_v/to_out, fused as VideoDiT)."""
_ADAPTER = "default"  # peft's adapter name; one adapter per model here
_PARTS = ("lora_A", "lora_B")


def lora_scale(rank: int, alpha: float | None) -> float:
    """alpha / rank; alpha None means alpha = rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return (alpha if alpha is not None else rank) / rank


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_layers(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear layers of `model` that `targets` select; ValueError if a target
    selects nothing (a typo would otherwise train no adapter there, silently)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("LoRA target_modules is empty")
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if unmatched:
        tails = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linear})
        raise ValueError(f"LoRA target_modules {unmatched} match no nn.Linear of the model; "
                         f"its linear layers are {tails}")
    return [n for n in linear if any(_matches(n, t) for t in targets)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
             whole: Whole | None = None) -> nn.Module:
    """Wrap the target layers with LoRA adapters in place; only the adapters stay trainable.

    Adapters start as peft's (A Kaiming-uniform, B zero: the adapted model is the base), drawn
    from a generator seeded by the layer's name, inside `whole` (see VideoDiT.init_weights): a
    model partitioned as it is built (ZeRO-3) has its adapters split before peft could set
    them, and gets the same ones as an unpartitioned model."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - optional extra, heavy

    layers = target_layers(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        lora_dropout=dropout, target_modules=layers, bias="none")
    model = inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    whole = whole or (lambda params: contextlib.nullcontext())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and _ADAPTER in m.lora_A:
                a, b = m.lora_A[_ADAPTER].weight, m.lora_B[_ADAPTER].weight
                seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
                with whole([a, b]):
                    # Drawn on the CPU whatever the model's device (a CPU generator cannot fill
                    # a CUDA tensor), so an adapter starts the same on every device.
                    init = torch.empty(a.shape)
                    nn.init.kaiming_uniform_(init, a=math.sqrt(5),
                                             generator=torch.Generator().manual_seed(seed >> 1))
                    a.copy_(init)
                    nn.init.zeros_(b)
    for name, p in model.named_parameters():  # peft already does this; be explicit about it
        p.requires_grad_(any(f".{part}." in name for part in _PARTS))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(f".{_PARTS[0]}." in n for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters of a peft-wrapped model under VideoDiT names (`X.lora_A.weight`), detached."""
    out = {}
    for name, p in model.named_parameters():
        for part in _PARTS:
            tag = f".{part}.{_ADAPTER}."
            if tag in name:
                out[name.replace(tag, f".{part}.")] = p.detach().clone()
    return out


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The frozen base weights of a peft-wrapped model under VideoDiT names, adapters left out."""
    return {name.replace(".base_layer.", "."): t.detach().clone()
            for name, t in model.state_dict().items()
            if not any(f".{part}." in name for part in _PARTS)}


def merge_lora(state: dict[str, Tensor], lora: dict[str, Tensor],
               scale: float) -> dict[str, Tensor]:
    """Base weights + scale * B @ A for every adapted layer (float32 or better maths, the
    weights' dtype kept).

    Raises ValueError for adapters without a base layer, unpaired A/B, or mismatched shapes.
    """
    layers = {k.rsplit(".", 2)[0] for k in lora}
    out = dict(state)
    for layer in sorted(layers):
        a, b = lora.get(f"{layer}.lora_A.weight"), lora.get(f"{layer}.lora_B.weight")
        w = state.get(f"{layer}.weight")
        if a is None or b is None:
            raise ValueError(f"LoRA layer {layer}: needs both lora_A and lora_B weights")
        if w is None:
            raise ValueError(f"LoRA layer {layer}: the model has no {layer}.weight")
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA layer {layer}: A {tuple(a.shape)}, B {tuple(b.shape)} do "
                             f"not fit weight {tuple(w.shape)}")
        ct = torch.promote_types(w.dtype, torch.float32)  # bf16 weights merge in float32
        delta = b.to(w.device, ct) @ a.to(w.device, ct)  # (out, in)
        out[f"{layer}.weight"] = (w.to(ct) + scale * delta).to(w.dtype)
    return out


@torch.no_grad()
def merge_into(dit: VideoDiT, lora: dict[str, Tensor], scale: float) -> VideoDiT:
    """Fold adapters into a plain VideoDiT's weights in place (what render does at load)."""
    params = dict(dit.named_parameters())
    merged = merge_lora(dict(params), lora, scale)
    for layer in {k.rsplit(".", 2)[0] for k in lora}:
        params[f"{layer}.weight"].copy_(merged[f"{layer}.weight"])
    return dit


@torch.no_grad()
def load_lora(model: nn.Module, lora: dict[str, Tensor]) -> None:
    """Copy adapters (VideoDiT names) into a peft-wrapped model; every key must be used."""
    params = dict(model.named_parameters())
    for key, value in lora.items():
        layer, part, leaf = key.rsplit(".", 2)
        name = f"{layer}.{part}.{_ADAPTER}.{leaf}"
        if name not in params:
            raise ValueError(f"LoRA weight {key}: the model has no adapter there")
        params[name].copy_(value)


def export_dit(model: nn.Module, merge: bool, scale: float) -> tuple[VideoDiT, dict | None]:
    """A plain VideoDiT for a package from a (possibly peft-wrapped) trained DiT.

    Without adapters the model is returned as is. With adapters: merge=True gives the merged
    weights and no separate adapters; merge=False gives the untouched base weights and the
    adapters (for lora.safetensors, merged at load).
    """
    if not has_lora(model):
        return model, None
    lora = {k: v.cpu() for k, v in lora_state_dict(model).items()}
    state = {k: v.cpu() for k, v in base_state_dict(model).items()}
    if merge:
        state = merge_lora(state, lora, scale)
    with torch.device("meta"):
        dit = VideoDiT(model.config)
    dit.load_state_dict(state, strict=True, assign=True)
    return dit, None if merge else lora
