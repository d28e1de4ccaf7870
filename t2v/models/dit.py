"""VideoDiT: the latent video diffusion transformer, Wan-2.1-compatible by construction.

Reads top-down: config and presets -> 3D RoPE -> embedders -> attention -> block -> final layer ->
model. Diffusers-format Wan 2.1 T2V weights load through `t2v.models.wan`; the layout below is ours
(fused QKV, fused cross-attention KV), the maths is Wan's, so converted weights give the same output.

Initialisation (what `VideoDiT.__init__` does, and why):
- Linear layers: Xavier-uniform weights, zero biases; the patch embedding Xavier on its flattened
  kernel; text and time MLPs normal(std 0.02). All as Wan 2.1.
- adaLN-zero where Wan's structure allows: the shared time projection (6*dim modulation) is zero
  and the gate rows of every block's `modulation` offset are zero, so both gated branches
  (self-attention, FFN) start at exactly zero. Wan's cross-attention has no gate, so its output
  projection is zero instead. Every block therefore starts as the identity. Shift/scale rows of
  the block and final-layer offsets are randn/sqrt(dim), as Wan.
- The final linear (weight and bias) is zero, so the DiT output is exactly zero at init.

Precision: LayerNorms, modulations, RoPE and gated residual adds run in float32 (float64 if the
model is float64), matching diffusers, so that bf16 training stays close to the reference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from t2v.models.rope import apply_rope, grid_positions, rope_angles

Whole = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]
"""A context factory: inside `with whole(params):` those parameters are whole tensors (see
`VideoDiT.init_weights`)."""


def _as_is(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class DiTConfig:
    """Geometry of a VideoDiT; travels inside every checkpoint and model package."""

    in_channels: int = 16
    """Latent channels C of the VAE."""
    out_channels: int | None = None
    """Predicted channels; None means `in_channels`."""
    patch: tuple[int, int, int] = (1, 2, 2)
    """(frames, height, width) patch of the 3D patch embedding."""
    dim: int = 384
    """Transformer width."""
    ffn_dim: int = 1536
    """Hidden width of the feed-forward network."""
    heads: int = 6
    """Attention heads; head_dim = dim / heads (even, >= 6 for the 3D RoPE split)."""
    depth: int = 10
    """Number of transformer blocks."""
    text_dim: int = 384
    """Width of the text encoder's token embeddings (384 MiniLM, 4096 umT5)."""
    freq_dim: int = 256
    """Channels of the sinusoidal timestep embedding."""
    qk_norm: bool = True
    """RMSNorm on queries and keys, across all heads (Wan's "rms_norm_across_heads")."""
    cross_attn_norm: bool = True
    """Affine LayerNorm before cross-attention."""
    eps: float = 1e-6
    """Epsilon of every norm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    text_mask: bool = True
    """Mask padded text tokens out of cross-attention. False attends to every position, the
    zero-padded ones included, as Wan 2.1 was trained (its pipeline passes no mask); imported
    Wan packages set False so that they reproduce Wan's outputs."""

    def __post_init__(self) -> None:
        self.patch = tuple(int(p) for p in self.patch)  # JSON gives a list
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints, got {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        head_dim = self.dim // self.heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim={head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        # Packages written before activation checkpointing left the config (a training switch,
        # VideoDiT.checkpointing) still carry the key: it says nothing about the network.
        d = {k: v for k, v in d.items() if k != "checkpointing"}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown DiTConfig keys: {unknown}")
        return cls(**d)


DIT_PRESETS: dict[str, DiTConfig] = {
    # ~1.0M params: CPU tests and the laptop demo.
    "debug": DiTConfig(in_channels=4, dim=128, ffn_dim=512, heads=2, depth=3, text_dim=384),
    # ~25M params: CPU training of the shapes benchmark.
    "small": DiTConfig(in_channels=16, dim=384, ffn_dim=1536, heads=6, depth=10, text_dim=384),
    # ~312M params, MiniLM text (384); pass text_dim=4096 to condition on umT5 instead.
    "base": DiTConfig(in_channels=16, dim=1024, ffn_dim=4096, heads=8, depth=18, text_dim=384),
    # Exactly Wan 2.1 T2V 1.3B (umT5-xxl text, 16-channel Wan VAE latents).
    "large": DiTConfig(in_channels=16, dim=1536, ffn_dim=8960, heads=12, depth=30, text_dim=4096),
}


def dit_config(name: str, **overrides: object) -> DiTConfig:
    """A preset by name, with field overrides (`dit_config("small", text_dim=4096)`)."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; known: {list(DIT_PRESETS)}")
    return DiTConfig.from_dict({**DIT_PRESETS[name].to_dict(), **overrides})


# ----------------------------------------------------------------------------- embedders


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B, dim), cos half first as Wan; float32 as diffusers computes it."""
    half = dim // 2
    j = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * j / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class MLP(nn.Module):
    """Linear -> activation -> Linear: the text embedder, time embedder and FFN."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.act = act
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(x: Tensor, eps: float, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
    """LayerNorm in float32, whatever the model dtype (float64 stays float64), as diffusers."""
    ct = torch.promote_types(x.dtype, torch.float32)
    w, b = (None, None) if weight is None else (weight.to(ct), bias.to(ct))
    return F.layer_norm(x.to(ct), x.shape[-1:], w, b, eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) modulations broadcast over tokens."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


# ----------------------------------------------------------------------------- attention


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of q (B, N, H, Dh) over k, v (B, S, H, Dh) -> (B, N, H, Dh)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask)  # (B, H, N, Dh)
    return o.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with QK RMSNorm across heads: self (with 3D RoPE) or cross to text."""

    def __init__(self, cfg: DiTConfig, cross: bool) -> None:
        super().__init__()
        self.heads = cfg.heads
        if cross:  # queries from video tokens, fused keys/values from text tokens
            self.q = nn.Linear(cfg.dim, cfg.dim)
            self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        else:  # fused: one GEMM instead of three
            self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.norm_q = nn.RMSNorm(cfg.dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(cfg.dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.attend: Callable[..., Tensor] = sdpa
        """The attention core (q, k, v (B, S, H, Dh), mask) -> (B, N, H, Dh): a plain attribute,
        not a weight; sequence parallelism swaps it from outside (sequence_parallel.py)."""

    def forward(self, x: Tensor, ctx: Tensor | None = None, rope: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        if ctx is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, D) each
        else:
            q = self.q(x)  # (B, N, D)
            k, v = self.kv(ctx).chunk(2, dim=-1)  # (B, L, D) each
        q = self.norm_q(q).unflatten(2, (self.heads, -1))  # (B, N, H, Dh)
        k = self.norm_k(k).unflatten(2, (self.heads, -1))  # (B, S, H, Dh), S = N or L
        v = v.unflatten(2, (self.heads, -1))  # (B, S, H, Dh)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.out(self.attend(q, k, v, mask).flatten(2))  # (B, N, D)


# ----------------------------------------------------------------------------- block


class DiTBlock(nn.Module):
    """Self-attention, cross-attention and FFN; adaLN-zero modulation of the first and last."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg, cross=False)
        self.cross_norm = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.cross_attn = Attention(cfg, cross=True)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, nn.GELU(approximate="tanh"))
        # Learned per-block offset added to the shared time projection (Wan's scale_shift_table):
        # rows are shift/scale/gate of self-attention, then shift/scale/gate of the FFN.
        self.modulation = nn.Parameter(torch.empty(1, 6, cfg.dim))

    def forward(
        self, x: Tensor, ctx: Tensor, mod: Tensor, rope: Tensor, mask: Tensor | None,
        keep: Tensor | None,
    ) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        m = (self.modulation.to(ct) + mod.to(ct)).unbind(1)  # 6 x (B, D)
        h = _modulate(_layer_norm(x, self.eps), m[0], m[1]).type_as(x)  # (B, N, D)
        x = torch.addcmul(x.to(ct), self.self_attn(h, rope=rope), m[2][:, None]).type_as(x)
        n = self.cross_norm
        h = x if n is None else _layer_norm(x, self.eps, n.weight, n.bias).type_as(x)  # (B, N, D)
        c = self.cross_attn(h, ctx, mask=mask)  # (B, N, D)
        x = x + (c if keep is None else c * keep)  # text-less rows get no cross-attention
        h = _modulate(_layer_norm(x, self.eps), m[3], m[4]).type_as(x)  # (B, N, D)
        return torch.addcmul(x.to(ct), self.ffn(h), m[5][:, None]).type_as(x)  # (B, N, D)


class FinalLayer(nn.Module):
    """LayerNorm modulated by the raw time embedding plus a learned offset, then linear."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))  # shift, scale
        self.linear = nn.Linear(cfg.dim, math.prod(cfg.patch) * cfg.output_channels)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        shift, scale = (self.modulation.to(ct) + temb.to(ct)[:, None]).unbind(1)  # (B, D) x 2
        x = _modulate(_layer_norm(x, self.eps), shift, scale).type_as(x)  # (B, N, D)
        return self.linear(x)  # (B, N, pt*ph*pw*C_out)


# ----------------------------------------------------------------------------- model


@dataclass
class Conditioning:
    """What every block sees besides the tokens (VideoDiT.embed)."""

    grid: tuple[int, int, int]
    ctx: Tensor  # (B, L, D) text tokens
    mod: Tensor  # (B, 6, D) shared time modulation
    temb: Tensor  # (B, D) time embedding (the head's modulation)
    mask: Tensor | None  # (B, 1, 1, L) cross-attention mask
    keep: Tensor | None  # (B, 1, 1) 0 for rows without text


class VideoDiT(nn.Module):
    """Text-conditioned velocity predictor on video latents (B, C, T, H, W)."""

    def __init__(self, cfg: DiTConfig, whole: Whole | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.checkpointing = False
        """Activation checkpointing of each block in training (memory for recompute): a switch
        that training sets from outside, not part of the network's config."""
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, cfg.patch, stride=cfg.patch)
        self.text_embed = MLP(cfg.text_dim, cfg.dim, cfg.dim, nn.GELU(approximate="tanh"))
        self.time_embed = MLP(cfg.freq_dim, cfg.dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Linear(cfg.dim, 6 * cfg.dim)  # ONE projection shared by all blocks
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.head = FinalLayer(cfg)
        self._rope_cache: dict[tuple, Tensor] = {}
        self.init_weights(whole)

    def compile_blocks(self) -> None:
        """`torch.compile` each block in place (the torchtitan pattern): the blocks share one
        compiled graph per input shape, so compiling costs about one block's tracing however
        deep the model is, and the state dict keeps its names. Fuses the elementwise work
        around the matmuls and attention (modulation, norms, GELU): the debug DiT's training
        step ~1.2x faster on a CPU (BENCHMARKS.md). On a CPU inductor needs a C++ compiler."""
        for block in self.blocks:
            block.compile()

    @torch.no_grad()
    def init_weights(self, whole: Whole | None = None) -> None:
        """Wan 2.1's init plus adaLN-zero (see the module docstring); works on meta tensors.

        `whole(params)` is a context in which those parameters are whole tensors and what is
        written to them sticks: the identity by default. Training at ZeRO-3 builds the model
        partitioned and passes a gather of just those parameters; the random draws are the same
        in the same order, so both start from the same weights.
        """
        whole = whole or _as_is
        dim = self.config.dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                with whole([m.weight, m.bias]):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                with whole(list(m.parameters(recurse=False))):
                    nn.init.ones_(m.weight)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
        with whole([self.patch_embed.weight, self.patch_embed.bias]):
            nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))
            nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.text_embed.fc1, self.text_embed.fc2,
                    self.time_embed.fc1, self.time_embed.fc2):
            with whole([lin.weight]):
                nn.init.normal_(lin.weight, std=0.02)
        with whole([self.time_proj.weight, self.time_proj.bias]):
            nn.init.zeros_(self.time_proj.weight)
            nn.init.zeros_(self.time_proj.bias)
        for block in self.blocks:
            with whole([block.modulation, block.cross_attn.out.weight]):
                block.modulation.copy_(torch.randn_like(block.modulation) / dim**0.5)
                block.modulation[:, [2, 5]] = 0.0  # gates: branches start at zero
                nn.init.zeros_(block.cross_attn.out.weight)  # Wan's cross-attention: no gate
        with whole([self.head.modulation, self.head.linear.weight, self.head.linear.bias]):
            self.head.modulation.copy_(torch.randn_like(self.head.modulation) / dim**0.5)
            nn.init.zeros_(self.head.linear.weight)
            nn.init.zeros_(self.head.linear.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, x_shape: tuple[int, ...], text_len: int) -> int:
        """Forward FLOPs (multiply-add = 2) of one call on x of `x_shape` and `text_len` tokens.

        Counts every matmul: with N = B*n video tokens (n per sample), M = B*L text tokens, d = dim,
          patch/head 2N*d*(C*prod(patch) + C_out*prod(patch)), text MLP 2M*(text_dim*d + d*d),
          per block: projections 2N*(4d^2 + 2d^2 + 2*d*ffn) + 2M*2d^2,
                     attention 4*B*n*n*d (QK^T and AV) + 4*N*L*d (cross).
        Time MLPs are O(B) and left out; norms/elementwise are not FLOPs of a matmul unit.
        Training (forward + backward) is 3x this.
        """
        c = self.config
        b, n = x_shape[0], math.prod(s // p for s, p in zip(x_shape[2:], c.patch, strict=True))
        big_n, m, d, pp = b * n, b * text_len, c.dim, math.prod(c.patch)
        total = 2 * big_n * d * pp * (c.in_channels + c.output_channels)
        total += 2 * m * (c.text_dim * d + d * d)
        block = 2 * big_n * (6 * d * d + 2 * d * c.ffn_dim) + 2 * m * 2 * d * d
        block += 4 * b * n * n * d + 4 * big_n * text_len * d
        return int(total + c.depth * block)

    def grid(self, x_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Token grid (T', H', W') for a latent of `x_shape`; ValueError if not divisible."""
        c = self.config
        if len(x_shape) != 5 or x_shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, T, H, W), got {tuple(x_shape)}")
        if any(s % p for s, p in zip(x_shape[2:], c.patch, strict=True)):
            raise ValueError(f"latent (T, H, W)={tuple(x_shape[2:])} not divisible by patch {c.patch}")
        return tuple(s // p for s, p in zip(x_shape[2:], c.patch, strict=True))

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> Tensor:
        """Complex rotations (N, 1, head_dim/2) for a grid, cached by grid, device and dtype.

        complex128 for a float64 model, complex64 otherwise (RoPE always runs in float32+).
        """
        dtype = torch.complex128 if self.patch_embed.weight.dtype == torch.float64 else torch.complex64
        key = (grid, str(device), dtype)
        if key not in self._rope_cache:
            pos = grid_positions(grid, device)  # (N, 3)
            ang = rope_angles(pos, self.config.head_dim, self.config.rope_theta)  # (N, Dh/2)
            rot = torch.polar(torch.ones_like(ang), ang).to(dtype)  # (N, Dh/2)
            self._rope_cache[key] = rot[:, None]  # (N, 1, Dh/2)
        return self._rope_cache[key]

    def forward(
        self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor | None = None
    ) -> Tensor:
        """Velocity (B, C_out, T, H, W) for latents x (B, C, T, H, W) at flow time t (B,) in [0, 1].

        The timestep is embedded as t * 1000, which equals Wan/diffusers' `timestep`. text is
        (B, L, text_dim) with text_mask (B, L), True = real token; a row with no real token gets
        no cross-attention at all (zero branch output), never NaN. With `config.text_mask` False
        the mask is ignored (Wan's convention, see DiTConfig).

        The three steps are public so that parallelism can be applied from outside (the token
        sequence split across ranks between them: sequence_parallel.py).
        """
        tokens, cond = self.embed(x, t, text, text_mask)  # (B, N, D)
        tokens = self.run_blocks(tokens, cond, self.rope(cond.grid, x.device))
        return self.unpatchify(self.head(tokens, cond.temb), cond.grid)

    def embed(self, x: Tensor, t: Tensor, text: Tensor,
              text_mask: Tensor | None = None) -> tuple[Tensor, Conditioning]:
        """Video tokens (B, N, D) and what every block is conditioned on."""
        c = self.config
        b = x.shape[0]
        grid = self.grid(x.shape)
        if t.shape != (b,) or text.ndim != 3 or text.shape[0] != b or text.shape[2] != c.text_dim:
            raise ValueError(f"need t (B,) and text (B, L, {c.text_dim}) for B={b}, got "
                             f"t {tuple(t.shape)}, text {tuple(text.shape)}")
        # contiguous: elementwise ops keep the strides of their input, so a transposed view
        # here would make every later LayerNorm and GEMM copy it.
        x = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        ts = (t.double() * 1000).float()  # Wan's timestep in [0, 1000], in float32 even for bf16 t
        emb = timestep_embedding(ts, c.freq_dim).to(self.time_embed.fc1.weight.dtype)  # (B, F)
        temb = self.time_embed(emb)  # (B, D)
        mod = self.time_proj(F.silu(temb)).unflatten(1, (6, c.dim))  # (B, 6, D)
        mask = keep = None
        if text_mask is not None and c.text_mask:
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"text_mask {tuple(text_mask.shape)} != text (B, L) "
                                 f"{tuple(text.shape[:2])}")
            real = text_mask.bool()  # (B, L)
            # Positions no sample of the batch uses are masked out of every softmax: dropping
            # them before the text projection changes nothing but the cost (the demo's 7-9-token
            # prompts padded to 64 were 23 % of its DiT's matmul FLOPs). One host sync per
            # forward; models with text_mask False (Wan's convention) keep every token.
            used = real.any(dim=0)  # (L,)
            if not bool(used.all()):
                cols = used.nonzero().flatten() if bool(used.any()) else used.new_zeros(1).long()
                text, real = text[:, cols], real[:, cols]  # (B, L', .)
            has_text = real.any(dim=1, keepdim=True)  # (B, 1)
            mask = (real | ~has_text)[:, None, None, :]  # (B, 1, 1, L): no all-False rows
            keep = has_text[:, :, None].to(x.dtype)  # (B, 1, 1): zero branch for no-text rows
        ctx = self.text_embed(text.to(x.dtype))  # (B, L', D)
        return x, Conditioning(grid, ctx, mod, temb, mask, keep)

    def run_blocks(self, x: Tensor, cond: Conditioning, rope: Tensor) -> Tensor:
        """The blocks over tokens x (B, n, D) with their rotations rope (n, 1, Dh/2)."""
        args = (cond.ctx, cond.mod, rope, cond.mask, cond.keep)
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)  # (B, n, D)
        return x

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Head outputs (B, N, pt*ph*pw*C_out) -> (B, C_out, T, H, W)."""
        c, b = self.config, x.shape[0]
        (pt, ph, pw), (gt, gh, gw) = c.patch, grid
        x = x.reshape(b, gt, gh, gw, pt, ph, pw, c.output_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C_out, T', pt, H', ph, W', pw)
        return x.reshape(b, c.output_channels, gt * pt, gh * ph, gw * pw)  # (B, C_out, T, H, W)
