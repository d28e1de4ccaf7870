"""Experiment tracking beside TensorBoard: an MLflow or W&B run written by rank 0 (`tracker`).

RUN/tb/ is always written (t2v/train/monitor.py). `tracker: mlflow | wandb` also sends the
resolved config (MLflow params / W&B run config), every metric the run logs (train/*, val/*),
RUN/config.yaml (t2v_config.yaml in W&B) and each validation's folder RUN/samples/step_N/
(videos, GIFs, contact sheet, captions) to that tracker. The tracked run's id is kept in
RUN/tracker.json (one entry per tracker, through t2v.storage): a resumed run, or a restarted
worker group, reopens the same MLflow / W&B run and sends no metric for a step that run already
holds (W&B: it drops those itself, with a warning).

MLflow's store, chosen by the driver (`check_tracker`, so the workers need none of its
environment): `tracker_uri`, else MLFLOW_TRACKING_URI, else a file store in RUN/mlruns. An s3://
RUN has no file store: it needs a server URI, and is refused at start without one. MLflow 3
refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set; t2v sets it when it writes one.
MLflow params cannot change once logged: a resumed run adds new keys only, and RUN/config.yaml
(an artifact, sent again on every start) has the current values.

A tracker that is not installed stops the run in the driver, with the pip command, before Ray
starts. A tracker that fails while training (a server down, a disk full) is warned about once
and dropped for the rest of that attempt: training goes on, and TensorBoard has everything.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

from t2v import storage
from t2v.config import TrainConfig
from t2v.console import say

INSTALL = {"mlflow": "pip install mlflow-skinny", "wandb": "pip install wandb"}
"""What to run for a tracker that is not installed (both: pip install 't2v[tracking]')."""
PARAM_CHARS = 500
"""MLflow param values are cut here (servers before MLflow 2.7 refuse longer ones)."""


class Tracker(Protocol):
    """One tracked run, on rank 0."""

    def start(self, config: dict, previous: dict | None) -> tuple[dict, dict[str, int]]:
        """Open the run `previous` names (what an earlier start returned) or a new one, and log
        `config`. Returns (what names the run, kept in RUN/tracker.json; the last step of each
        metric the run holds, {} for a new run)."""

    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def artifact(self, local: str, path: str, step: int) -> None:
        """Attach the file `local` to the run as `path` (e.g. samples/step_000004/sheet.png)."""

    def finish(self) -> None: ...


# ----------------------------------------------------------------------------- driver


def check_tracker(cfg: TrainConfig, run_uri: str) -> TrainConfig:
    """In the driver, before Ray starts: the tracker's client must be installed, and MLflow gets
    its store now (returned as `tracker_uri`), from this process's environment."""
    if cfg.tracker == "tensorboard":
        return cfg
    if find_spec(cfg.tracker) is None:
        raise ValueError(f"tracker={cfg.tracker} needs its client, which is not installed: "
                         f"{INSTALL[cfg.tracker]}  (or: pip install 't2v[tracking]')")
    if cfg.tracker == "mlflow":
        return cfg.model_copy(update={"tracker_uri": mlflow_uri(cfg, run_uri)})
    return cfg


def mlflow_uri(cfg: TrainConfig, run_uri: str) -> str:
    """`tracker_uri`, else MLFLOW_TRACKING_URI, else a file store in RUN/mlruns (a local RUN).
    A plain path becomes an absolute file: URI (rank 0 runs in another directory)."""
    uri = cfg.tracker_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and ":" not in uri.split("/")[0] and not uri.startswith("databricks"):
        return Path(uri).expanduser().resolve().as_uri()
    if uri:
        return uri
    if storage.is_s3(run_uri):
        raise ValueError(f"tracker=mlflow: the run {run_uri} is in object storage, where no "
                         "MLflow file store can live: set tracker_uri (or MLFLOW_TRACKING_URI) "
                         "to an MLflow server, e.g. http://mlflow-host:5000")
    return storage.local_path(storage.join(run_uri, "mlruns")).resolve().as_uri()


# ----------------------------------------------------------------------------- trackers


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"optim.lr": "0.001", ...}; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


@contextmanager
def named(local: str, name: str) -> Iterator[str]:
    """`local` under the file name `name` (a temporary copy when it has another one)."""
    if os.path.basename(local) == name:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="t2v-artifact-") as d:
        shutil.copyfile(local, os.path.join(d, name))
        yield os.path.join(d, name)


class MLflow:
    """A run in an MLflow store (server or file store), through MlflowClient: no global state."""

    def __init__(self, uri: str, experiment: str, name: str) -> None:
        self.uri, self.experiment, self.name = uri, experiment, name
        self.client, self.run_id = None, ""

    def start(self, config: dict, previous: dict | None) -> tuple[dict, dict[str, int]]:
        if storage.is_local(self.uri):  # a file store (MLflow 3 refuses them by default)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A server that does not answer costs ~9 s, once (then the tracker is dropped), not the
        # minutes of MLflow's default 7 retries with doubling waits: the ranks wait on rank 0.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Param  # noqa: PLC0415 - optional: tracker=mlflow
        from mlflow.exceptions import MlflowException  # noqa: PLC0415 - optional: tracker=mlflow
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 - optional: tracker=mlflow

        c, run, last = MlflowClient(tracking_uri=self.uri), None, {}
        self.client = c
        if previous:
            try:
                run = c.get_run(previous["run_id"])
            except MlflowException as e:  # another store than the last attempt's: a new run
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            if run is None or run.info.lifecycle_stage != "active":
                run = None
                say(f"[t2v] mlflow run {previous['run_id']} (RUN/tracker.json) is not an "
                    f"active run of {self.uri}: starting a new one")
        if run is None:
            exp = c.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else c.create_experiment(self.experiment)
            run = c.create_run(exp_id, run_name=self.name)
        else:
            c.update_run(run.info.run_id, status="RUNNING")
            last = {key: max(m.step for m in c.get_metric_history(run.info.run_id, key))
                    for key in run.data.metrics}
        self.run_id = run.info.run_id
        params = [Param(k, v[:PARAM_CHARS]) for k, v in flat(config).items()
                  if k not in run.data.params]  # logged params cannot change
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            c.log_batch(self.run_id, params=params[i:i + 100])
        return {"run_id": self.run_id, "experiment_id": run.info.experiment_id}, last

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 - optional: tracker=mlflow

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def artifact(self, local: str, path: str, step: int) -> None:
        folder, name = posixpath.split(path)
        with named(local, name) as f:
            self.client.log_artifact(self.run_id, f, folder or None)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class WandB:
    """A W&B run (WANDB_MODE=offline: written under DIR/wandb/, `wandb sync` uploads it)."""

    def __init__(self, project: str, name: str, folder: str) -> None:
        self.project, self.name, self.folder = project, name, folder
        self.run = None

    def start(self, config: dict, previous: dict | None) -> tuple[dict, dict[str, int]]:
        import wandb  # noqa: PLC0415 - optional: tracker=wandb

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        same = previous if previous and previous.get("project") == self.project else None
        # console off: Ray already collects the workers' output; W&B would wrap it again.
        self.run = wandb.init(project=self.project, name=self.name, dir=self.folder,
                              id=same["run_id"] if same else None, resume="allow",
                              settings=wandb.Settings(console="off", silent=True))
        self.run.config.update(config, allow_val_change=True)
        # W&B itself drops a step below the run's current one (with a warning).
        return {"run_id": self.run.id, "project": self.project}, {}

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, local: str, path: str, step: int) -> None:
        import wandb  # noqa: PLC0415 - optional: tracker=wandb

        if path == "config.yaml":  # W&B writes its own config.yaml in the run folder
            path = "t2v_config.yaml"
        dest = Path(self.run.dir, path)  # W&B uploads files from its run folder
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
        self.run.save(str(dest), base_path=self.run.dir, policy="now")
        media = {".png": wandb.Image, ".mp4": wandb.Video}.get(dest.suffix)
        if media is not None and path.startswith("samples/"):  # also shown in the dashboard
            self.run.log({f"val/{dest.stem}": media(str(dest))}, step=step)

    def finish(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------- rank 0


class Tracking:
    """Rank 0's tracker: reopened from RUN/tracker.json; its first failure drops it, warned."""

    def __init__(self, tracker: Tracker, kind: str, run_uri: str) -> None:
        self.tracker: Tracker | None = tracker
        self.kind, self.run_uri = kind, run_uri
        self.last: dict[str, int] = {}
        """The last step of each metric the tracked run held when it was (re)opened."""

    def start(self, config: dict) -> None:
        def start() -> None:
            uri = storage.join(self.run_uri, "tracker.json")
            saved = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
            record, self.last = self.tracker.start(config, saved.get(self.kind))
            storage.write_text(uri, json.dumps(saved | {self.kind: record}, indent=1) + "\n")
        self._guard("start", start)

    def metrics(self, values: dict[str, float], step: int) -> None:
        """Steps the tracked run holds already (an attempt that died after logging them) are
        not sent again: a resumed run repeats them exactly (t2v/train/trainer.py)."""
        values = {k: v for k, v in values.items() if step > self.last.get(k, 0)}
        if values:
            self._guard(f"log step {step}", lambda: self.tracker.metrics(values, step))

    def artifact(self, uri: str, path: str, step: int) -> None:
        """The file or object `uri` as the run's `path`."""
        def send() -> None:
            with storage.local_copy(uri) as local:
                self.tracker.artifact(str(local), path, step)
        self._guard(f"send {path}", send)

    def finish(self) -> None:
        self._guard("finish", lambda: self.tracker.finish())
        self.tracker = None

    def _guard(self, what: str, call) -> None:
        if self.tracker is None:
            return
        try:
            call()
        except Exception as e:  # any failure of the tracker: training must go on
            self.tracker = None
            why = (str(e).strip().splitlines() or [""])[0][:300]
            say(f"[t2v] tracker {self.kind} failed ({what}: {type(e).__name__}: {why}): "
                f"dropped for the rest of this attempt; training goes on, TensorBoard has "
                f"every metric")


def open_tracking(cfg: TrainConfig, run_uri: str) -> Tracking | None:
    """Rank 0: the configured tracker (None for tensorboard), started, RUN/config.yaml sent."""
    if cfg.tracker == "tensorboard":
        return None
    if cfg.tracker == "mlflow":
        tracker: Tracker = MLflow(mlflow_uri(cfg, run_uri), cfg.tracker_project, cfg.name)
    else:
        folder = (str(storage.local_path(run_uri)) if storage.is_local(run_uri)
                  else os.environ.get("WANDB_DIR") or tempfile.mkdtemp(prefix="t2v-wandb-"))
        tracker = WandB(cfg.tracker_project, cfg.name, folder)
    tracking = Tracking(tracker, cfg.tracker, run_uri)
    tracking.start(cfg.model_dump(mode="json"))
    config = storage.join(run_uri, "config.yaml")
    if storage.exists(config):  # written by the driver (t2v/train/trainer.py)
        tracking.artifact(config, "config.yaml", 0)
    return tracking
