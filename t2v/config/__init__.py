"""Typed configs: one pydantic model per component, with a docstring under every field (shown
by `t2v COMMAND --help-config`).

Files and overrides become these models in t2v/configfile.py (`load_config`). The models live in
base.py (Section, shared types), data.py, train.py and jobs.py (render, serve, import, export,
eval, demo); import them from here.
"""

from t2v.config.base import ActorPool, Section
from t2v.config.data import EncodeConfig, PackConfig, ReaderConfig, SynthConfig
from t2v.config.jobs import (
    DemoConfig,
    EvalConfig,
    ExportConfig,
    ImportConfig,
    RenderConfig,
    ServeConfig,
)
from t2v.config.train import (
    FaultConfig,
    LoRAConfig,
    OptimConfig,
    TrainConfig,
    TrainDataConfig,
)

__all__ = [
    "ActorPool", "DemoConfig", "EncodeConfig", "EvalConfig", "ExportConfig", "FaultConfig",
    "ImportConfig", "LoRAConfig", "OptimConfig", "PackConfig", "ReaderConfig", "RenderConfig",
    "Section", "ServeConfig", "SynthConfig", "TrainConfig", "TrainDataConfig",
]
