"""The training stages by name: `TrainConfig.stage` picks one task class, once per process."""

from __future__ import annotations

from t2v.config import TrainConfig
from t2v.train.dit_task import DiTTask
from t2v.train.task import StageTask
from t2v.train.vae_task import VAETask

STAGES: dict[str, type[StageTask]] = {"vae": VAETask, "dit": DiTTask}


def task_for(cfg: TrainConfig) -> StageTask:
    return STAGES[cfg.stage](cfg)
