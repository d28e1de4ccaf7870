"""The small training data set the tests' Ray Train runs use, as plain functions.

tests/conftest.py wraps them in session fixtures (`train_raw`, `debug_vae_package`,
`train_latents`); tests/benchmarks/bench_startup.py calls them directly, so the benchmark times
the runs the suite makes on the very same data.
"""

from __future__ import annotations


def write_train_raw(raw: str) -> str:
    """5 synthetic 9x32x32 clips in shards of 2 (the last shard is held out), alt captions on."""
    from t2v.config import SynthConfig
    from t2v.data.synthetic import run_synth

    run_synth(SynthConfig(out=raw, num=5, frames=9, size=32, shard_size=2, seed=21,
                          alt_captions=True))
    return raw


def write_debug_vae_package(uri: str) -> str:
    """A VAE-only package of the debug preset: random weights (seed 0), fitted latent stats,
    MiniLM text config of length 16."""
    import torch

    from t2v.models.latent import fit_latent_stats
    from t2v.models.package import save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, vae_config

    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config("debug")).eval()
    with torch.no_grad():
        shift, scale = fit_latent_stats(vae.encode(torch.rand(4, 3, 9, 32, 32) * 2 - 1).mean)
    vae.set_latent_stats(shift=shift, scale=scale)
    save_package(uri, vae=vae, text=TextEncoderConfig(max_length=16), run={"stage": "test"})
    return uri


def write_train_latents(raw: str, vae: str, out: str) -> str:
    """`raw` encoded by the package `vae` into latent shards at `out` (needs Ray running)."""
    from t2v.config import EncodeConfig
    from t2v.data.encode import run_encode

    run_encode(EncodeConfig(src=raw, out=out, vae=vae, batch_size=4))
    return out
