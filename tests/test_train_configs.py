"""Every shipped training config loads, validates, and names a real model preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from t2v.config import TrainConfig
from t2v.configfile import load_config
from t2v.models.dit import DIT_PRESETS
from t2v.models.vae import VAE_PRESETS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_the_four_named_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"debug", "demo", "small-gpu", "base-gpu-multinode"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_is_valid(path):
    cfg = load_config(TrainConfig, str(path))
    presets = VAE_PRESETS if cfg.stage == "vae" else DIT_PRESETS
    assert cfg.model in presets
    assert cfg.steps % cfg.ckpt_every == 0 or cfg.steps > cfg.ckpt_every
    if cfg.use_gpu:
        assert cfg.precision in ("bf16", "auto")
    else:
        assert cfg.precision in ("fp32", "auto")  # bf16 is slower on CPUs without AMX
