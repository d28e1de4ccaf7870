"""VideoDiT: shapes, init, RoPE, masking, checkpointing, presets, and equivalence with diffusers' Wan."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from t2v.models.dit import DIT_PRESETS, DiTConfig, VideoDiT, dit_config
from t2v.models.rope import apply_rope, grid_positions, rope_angles
from t2v.models.wan import convert_wan_state_dict, load_wan_transformer, wan_config_to_dit
from t2v.train.dit_task import cpp_compiler

PRESET_PARAMS: dict[str, int] = {
    "debug": 1_014_800,
    "small": 25_168_576,
    "base": 311_639_104,
    "large": 1_418_996_800,
}
"""Parameter counts of the presets (meta-device build)."""

TINY = dict(in_channels=4, dim=48, ffn_dim=96, heads=3, depth=2, text_dim=32)  # head_dim 16


def _randomize(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Normal weights everywhere, zero-initialised ones included, so comparisons are not trivial."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def _inputs(b: int = 2, c: int = 4, thw: tuple[int, int, int] = (3, 4, 6), length: int = 5,
            text_dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, *thw, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, length, text_dim, generator=g)
    return x, t, text


@pytest.mark.parametrize("thw", [(1, 4, 4), (3, 6, 10), (5, 8, 4), (2, 2, 12)])
def test_output_shapes(thw: tuple[int, int, int]) -> None:
    model = _randomize(VideoDiT(DiTConfig(**TINY))).eval()
    x, t, text = _inputs(thw=thw)
    with torch.no_grad():
        out = model(x, t, text)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_bf16_and_variants_run() -> None:
    x, t, text = _inputs()
    model = _randomize(VideoDiT(DiTConfig(**TINY))).to(torch.bfloat16)
    out = model(x.bfloat16(), t, text.bfloat16(), torch.ones(2, 5, dtype=torch.bool))
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    plain = VideoDiT(DiTConfig(**TINY, qk_norm=False, cross_attn_norm=False))
    assert plain.num_params() < VideoDiT(DiTConfig(**TINY)).num_params()
    assert plain(x, t, text).shape == x.shape


def test_out_channels_and_temporal_patch() -> None:
    model = VideoDiT(DiTConfig(**{**TINY, "out_channels": 8, "patch": (2, 2, 2)}))
    x, t, text = _inputs(thw=(4, 4, 6))
    assert model(x, t, text).shape == (2, 8, 4, 4, 6)


@pytest.mark.parametrize("thw", [(3, 5, 4), (3, 4, 7)])
def test_non_divisible_shape_is_an_error(thw: tuple[int, int, int]) -> None:
    model = VideoDiT(DiTConfig(**TINY))
    x, t, text = _inputs(thw=thw)
    with pytest.raises(ValueError, match=r"not divisible by patch \(1, 2, 2\)"):
        model(x, t, text)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\) not divisible by patch \(2, 2, 2\)"):
        VideoDiT(DiTConfig(**{**TINY, "patch": (2, 2, 2)}))(*_inputs(thw=(3, 4, 4)))


def test_output_is_exactly_zero_at_init() -> None:
    torch.manual_seed(0)
    model = VideoDiT(dit_config("debug"))
    x, t, text = _inputs(text_dim=384)
    out = model(x, t, text)
    assert torch.equal(out, torch.zeros_like(out))


def test_blocks_start_as_identity() -> None:
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(**TINY))
    x = torch.randn(2, 12, 48)
    ctx = torch.randn(2, 5, 48)
    mod = model.time_proj(torch.randn(2, 48)).unflatten(1, (6, 48))
    rope = model.rope((1, 3, 4), x.device)
    assert torch.equal(model.blocks[0](x, ctx, mod, rope, None, None), x)


def test_rope_logits_depend_only_on_relative_offset() -> None:
    torch.manual_seed(0)
    head_dim = 16  # split 8/4/4: frames get more channels than height and width
    q, k = torch.randn(2, 1, 1, 1, head_dim, dtype=torch.float64).unbind(0)  # (1, 1, 1, Dh) each

    def logit(pq: list[int], pk: list[int]) -> torch.Tensor:
        rot = torch.polar(torch.ones(2, head_dim // 2, dtype=torch.float64),
                          rope_angles(torch.tensor([pq, pk]), head_dim))[:, None]  # (2, 1, Dh/2)
        rq = apply_rope(q, rot[:1])
        rk = apply_rope(k, rot[1:])
        return (rq * rk).sum()

    pairs = [([0, 0, 0], [1, 2, 3]), ([2, 5, 1], [0, 3, 7]), ([4, 4, 4], [4, 4, 4])]
    for pq, pk in pairs:
        for shift in ([1, 0, 0], [0, 3, 0], [0, 0, 5], [7, 11, 2]):
            sq = [a + s for a, s in zip(pq, shift, strict=True)]
            sk = [a + s for a, s in zip(pk, shift, strict=True)]
            torch.testing.assert_close(logit(pq, pk), logit(sq, sk), rtol=0, atol=1e-12)
    # ... and the offset does matter, on every axis.
    for other in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert not torch.allclose(logit([0, 0, 0], [0, 0, 0]), logit([0, 0, 0], other))


def test_model_rope_grid_is_patch_order() -> None:
    model = VideoDiT(DiTConfig(**TINY))
    rope = model.rope((2, 3, 4), torch.device("cpu"))  # (24, 1, Dh/2)
    pos = grid_positions((2, 3, 4))
    assert pos[5].tolist() == [0, 1, 1]  # frame-major, then row, then column, as Conv3d flattens
    expected = torch.polar(torch.ones(24, 8, dtype=torch.float64), rope_angles(pos, 16))
    torch.testing.assert_close(rope[:, 0], expected.to(torch.complex64))


def test_masked_text_tokens_do_not_matter_and_empty_rows_are_finite() -> None:
    model = _randomize(VideoDiT(DiTConfig(**TINY))).eval()
    x, t, text = _inputs(length=6)
    mask = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    with torch.no_grad():
        out = model(x, t, text, mask)
        text2 = text.clone()
        text2[0, 3:] = torch.randn(3, 32) * 10  # padding of row 0
        text2[1] = torch.randn(6, 32)  # every token of the text-less row 1
        out2 = model(x, t, text2, mask)
        unmasked = model(x, t, text2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], unmasked[0])  # the mask really was applied
    # An all-False row means "no text" (zero cross-attention branch): finite gradients too.
    model(x[1:], t[1:], text2[1:], mask[1:]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unused_text_positions_are_dropped_exactly() -> None:
    """The forward drops text positions no row uses; each row's output and gradients equal
    those of the row alone with only its own tokens, and padding to 64 changes nothing."""
    model = _randomize(VideoDiT(DiTConfig(**TINY))).eval()
    x, t, text = _inputs(length=6)
    mask = torch.tensor([[True, True, False, False, False, False],
                         [True, False, False, True, False, False]])
    with torch.no_grad():
        out = model(x, t, text, mask)
        alone = [model(x[:1], t[:1], text[:1, :2], mask[:1, :2]),
                 model(x[1:], t[1:], text[1:, [0, 3]], mask[1:, [0, 3]])]
        padded = model(x, t, torch.nn.functional.pad(text, (0, 0, 0, 58)),
                       torch.nn.functional.pad(mask, (0, 58), value=False))
    torch.testing.assert_close(out, torch.cat(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, padded, rtol=0, atol=1e-6)
    grads = []
    for length in (6, 64):
        model.zero_grad()
        pad = length - 6
        model(x, t, torch.nn.functional.pad(text, (0, 0, 0, pad)),
              torch.nn.functional.pad(mask, (0, pad), value=False)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    flops = []
    for length in (6, 64):  # the padding costs nothing either
        pad = length - 6
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, torch.nn.functional.pad(text, (0, 0, 0, pad)),
                  torch.nn.functional.pad(mask, (0, pad), value=False))
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]


def test_checkpointing_gives_identical_gradients() -> None:
    x, t, text = _inputs()
    grads = []
    for ckpt in (False, True):
        model = _randomize(VideoDiT(DiTConfig(**TINY))).train()
        model.checkpointing = ckpt
        model(x, t, text, torch.rand(2, 5) > 0.3).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation for complex")
def test_compiled_blocks_match_eager(one_thread: None) -> None:
    """compile_blocks (train.compile) changes the speed, not the maths: the same outputs and
    gradients as the eager model to float32 rounding, and the state dict keeps its names
    (checkpoints and packages load either way). One shape: each compile costs ~25 s on 2 cores
    (a training run's second text length recompiles with dynamic shapes, upstream's path)."""
    eager = _randomize(VideoDiT(DiTConfig(**TINY))).train()
    compiled = _randomize(VideoDiT(DiTConfig(**TINY))).train()
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t, text = _inputs()
    mask = torch.arange(5)[None] < torch.tensor([3, 2])[:, None]  # (2, 5): 3 positions used
    outs, grads = [], []
    for model in (eager, compiled):
        out = model(x, t, text, mask)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_overfits_one_batch(one_thread: None) -> None:
    torch.manual_seed(0)
    model = VideoDiT(dit_config("debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randn(2, 4, 3, 8, 8)
    eps = torch.randn_like(x0)
    t = torch.rand(2)
    text = torch.randn(2, 8, 384)
    losses = []
    for _ in range(300):
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * eps  # rectified flow: x_t between data (t=0) and noise (t=1)
        loss = (model(xt, t, text) - (eps - x0)).square().mean()  # velocity target
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.05 * losses[0]:
            break
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_presets_and_param_counts() -> None:
    assert list(DIT_PRESETS)[0] == "debug"
    for name in DIT_PRESETS:
        with torch.device("meta"):
            n = VideoDiT(dit_config(name)).num_params()
        assert abs(n - PRESET_PARAMS[name]) <= 0.1 * PRESET_PARAMS[name], (name, n)
    assert 0.5e6 <= PRESET_PARAMS["debug"] <= 2e6
    assert 20e6 <= PRESET_PARAMS["small"] <= 30e6
    assert 250e6 <= PRESET_PARAMS["base"] <= 350e6


def test_large_preset_is_wan_1_3b() -> None:
    diffusers = pytest.importorskip("diffusers")
    wan_cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                   in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                   num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**wan_cfg)
        ours = VideoDiT(dit_config("large"))
    assert wan_config_to_dit(wan_cfg) == dit_config("large")
    assert ours.num_params() == sum(p.numel() for p in ref.parameters()) == PRESET_PARAMS["large"]


def test_config_dict_round_trip_and_errors() -> None:
    cfg = dit_config("small", text_dim=4096)
    assert DiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        DiTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="huge.*debug"):
        dit_config("huge")
    with pytest.raises(ValueError, match="heads"):
        DiTConfig(dim=100, heads=3)


def test_flops_estimate_matches_flop_counter() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = VideoDiT(DiTConfig(**TINY))
    x, t, text = _inputs(thw=(3, 4, 6), length=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text)  # the math backend is made of bmm's, which the counter sees
    estimate = model.flops(tuple(x.shape), text_len=5)
    assert abs(estimate - counter.get_total_flops()) <= 0.05 * estimate


# ----------------------------------------------------------------------------- Wan / diffusers


WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=64)


@pytest.fixture(scope="module")
def wan_reference() -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return _randomize(diffusers.WanTransformer3DModel(**WAN_TINY)).eval()


def _compare(ref: torch.nn.Module, ours: VideoDiT) -> None:
    # float32 is enough: the two agree to ~1e-7 on outputs of magnitude ~0.4.
    x, t, text = _inputs(thw=(3, 6, 10), length=7)
    with torch.no_grad():
        expected = ref(x, t * 1000, text, return_dict=False)[0]  # diffusers takes t * 1000
        got = ours.eval()(x, t, text, torch.ones(2, 7, dtype=torch.bool))
    assert expected.abs().max() > 0.1  # non-trivial output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_matches_diffusers_wan(wan_reference: torch.nn.Module, cross_attn_norm: bool) -> None:
    ref = wan_reference
    if not cross_attn_norm:
        import diffusers

        ref = _randomize(diffusers.WanTransformer3DModel(**{**WAN_TINY, "cross_attn_norm": False}))
    cfg = wan_config_to_dit(dict(ref.config))
    assert (cfg.dim, cfg.heads, cfg.text_dim, cfg.cross_attn_norm) == (32, 2, 32, cross_attn_norm)
    ours = VideoDiT(cfg)
    ours.load_state_dict(convert_wan_state_dict(ref.state_dict()))
    _compare(ref.eval(), ours)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_wan_transformer_from_save_pretrained(wan_reference: torch.nn.Module, tmp_path,
                                                   shard: str | None) -> None:
    kwargs = {"max_shard_size": shard} if shard else {}
    wan_reference.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    if shard:
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_wan_transformer(tmp_path)
    assert not any(p.is_meta for p in ours.parameters())
    _compare(wan_reference, ours)


def test_converter_refuses_mismatches(wan_reference: torch.nn.Module) -> None:
    sd = dict(wan_reference.state_dict())
    with pytest.raises(ValueError, match="leftover.*blocks.0.attn2.add_k_proj.weight"):
        convert_wan_state_dict({**sd, "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})
    del sd["blocks.1.attn1.to_k.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn1.to_k.bias'\]"):
        convert_wan_state_dict(sd)
    for key, value in [("image_dim", 1280), ("added_kv_proj_dim", 5120), ("pos_embed_seq_len", 514),
                       ("in_channels", 36), ("frobnicate", 1)]:
        with pytest.raises(ValueError, match=key):
            wan_config_to_dit({**WAN_TINY, key: value})
