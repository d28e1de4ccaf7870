"""t2v: Ray-native latent video diffusion."""

__version__ = "0.1.0"
