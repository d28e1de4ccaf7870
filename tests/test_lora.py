"""LoRA: adapters on VideoDiT (peft), merged == unmerged, and a Ray Train fine-tune of an
imported Wan package that changes only the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2v.models.dit import VideoDiT, dit_config
from t2v.models.lora import (
    add_lora,
    base_state_dict,
    export_dit,
    load_lora,
    lora_scale,
    lora_state_dict,
    merge_lora,
)

RANK, ALPHA = 4, 8.0


def _inputs(model: VideoDiT, b: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(b, c.in_channels, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    text = torch.randn(b, 6, c.text_dim, generator=g, dtype=torch.float64)
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, text, mask


def _adapted(seed: int = 0) -> tuple[VideoDiT, dict[str, torch.Tensor]]:
    """A debug DiT (random, non-zero output) with rank-4 adapters whose B is random too."""
    torch.manual_seed(seed)
    model = VideoDiT(dit_config("debug", depth=2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, RANK, ALPHA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapters would be a no-op
                p.normal_(0.0, 0.05)
    return model.eval(), base


def test_only_adapters_train_and_targets_are_checked() -> None:
    model, base = _adapted()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # qkv, out (self), q, kv, out (cross) in each of 2 blocks, A and B each
    assert len(trainable) == 2 * 5 * 2
    assert base_state_dict(model).keys() == base.keys()
    with pytest.raises(ValueError, match=r"\['to_q'\] match no nn.Linear.*self_attn.qkv"):
        add_lora(VideoDiT(dit_config("debug")), RANK, targets=["qkv", "to_q"])
    assert lora_scale(4, None) == 1.0 and lora_scale(4, 8.0) == 2.0


def test_merged_export_matches_unmerged_model() -> None:
    model, base = _adapted()
    inputs = _inputs(model)
    with torch.no_grad():
        unmerged = model(*inputs)  # peft layers: base(x) + scale * B(A(x))
        merged, none = export_dit(model, merge=True, scale=lora_scale(RANK, ALPHA))
        plain, lora = export_dit(model, merge=False, scale=lora_scale(RANK, ALPHA))
        assert none is None and set(lora) == set(lora_state_dict(model))
        for k, v in plain.state_dict().items():  # merge=False keeps the base untouched
            assert torch.equal(v, base[k]), k
        torch.testing.assert_close(merged(*inputs), unmerged, rtol=0, atol=1e-12)
        assert (plain(*inputs) - unmerged).abs().max() > 1e-3  # the adapters do something
        # and back: adapters loaded into a fresh wrapped base give the same model
        again = add_lora(plain, RANK, ALPHA)
        load_lora(again, lora)
        torch.testing.assert_close(again(*inputs), unmerged, rtol=0, atol=1e-12)


def test_merge_refuses_adapters_that_do_not_fit() -> None:
    model, base = _adapted()
    lora = lora_state_dict(model)
    key = "blocks.0.self_attn.qkv.lora_A.weight"
    with pytest.raises(ValueError, match="needs both lora_A and lora_B"):
        merge_lora(base, {key: lora[key]}, 1.0)
    with pytest.raises(ValueError, match="do not fit weight"):
        merge_lora(base, {key: lora[key][:, :5], key.replace("_A", "_B"):
                          lora[key.replace("_A", "_B")]}, 1.0)


# ----------------------------------------------------------------------------- Ray Train


def test_lora_finetune_of_imported_wan_changes_only_adapters(wan_lora_run, wan_package) -> None:
    """The session's LoRA fine-tune (conftest `wan_lora_run`: 3 steps on 2 workers from RAW
    shards, each batch encoded in the worker by the imported VAE + umT5 at 5x16x16, every linear
    layer adapted, exported unmerged) changed the adapters only."""
    from t2v.models.package import RenderDefaults, load_package, read_meta

    run, package = wan_lora_run
    pkg = Path(package)
    meta = read_meta(str(pkg))
    assert meta.lora == {"rank": RANK, "alpha": ALPHA,
                         "target_modules": ["qkv", "q", "kv", "out", "ffn.fc1", "ffn.fc2"]}
    assert meta.vae_ref == read_meta(wan_package).vae_ref and meta.dit.text_mask is False
    # Render defaults: the geometry of the clips it was tuned on (train_raw is 9x32x32 at 8 fps,
    # read at 5x16x16), the shift and sampling settings of the imported package it started from.
    assert meta.render == RenderDefaults(frames=5, height=16, width=16, fps=8.0, shift=3.0,
                                         steps=50, cfg=5.0, sampler="unipc")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(0 < v < float("inf") for v in losses)
    # alt_caption_prob=0.5 on the fly: umT5 embedded the clips' json `captions` in the workers
    assert 0 < sum(r["alt_caption_frac"] for r in rows if "loss" in r) / 3 < 1

    base = load_file(Path(wan_package) / "dit.safetensors")
    tuned = load_file(pkg / "dit.safetensors")
    assert tuned.keys() == base.keys()
    assert all(torch.equal(tuned[k], base[k]) for k in base)  # the base did not move
    lora = load_file(pkg / "lora.safetensors")
    assert len(lora) == 2 * 7 * 2  # A and B of 7 layers (qkv, out, q, kv, out, fc1, fc2) x 2 blocks
    assert all(lora[k].abs().max() > 0 for k in lora if "lora_B" in k)  # B left zero: trained

    # The package loads merged (what render and init_from see) == base + adapters unmerged.
    f64 = {"load_text": False, "load_vae": False, "dtype": torch.float64}
    merged = load_package(str(pkg), **f64).dit
    unmerged = load_package(wan_package, **f64).dit
    add_lora(unmerged, RANK, ALPHA, targets=meta.lora["target_modules"])
    load_lora(unmerged, {k: v.double() for k, v in lora.items()})
    inputs = _inputs(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs), unmerged.eval()(*inputs), rtol=0, atol=1e-10)
        plain = load_package(wan_package, **f64).dit
        assert (plain(*inputs) - merged(*inputs)).abs().max() > 1e-6
    assert any(p.name.endswith(".mp4") for p in run.rglob("*"))
