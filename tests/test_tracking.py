"""Experiment tracking (t2v/train/tracking.py): MLflow through its local file store, W&B offline.

The unit tests drive rank 0's Monitor as the worker loop does (steps, a validation that writes
RUN/samples/step_N/, a resume) and read the tracked run back with the tracker's own reader:
MlflowClient, or the records of W&B's offline run file. End to end: the session's `debug_run`
trains with tracker=mlflow (tests/conftest.py); a copy of its run directory resumed with more
steps continues the same MLflow run.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2v import storage
from t2v.config import TrainConfig
from t2v.train import tracking
from t2v.train.monitor import Monitor
from t2v.train.task import DataInfo, Validation
from t2v.train.trainer import run_train
from t2v.train.validation import record_validation
from tests.s3_fixtures import free_port

INFO = DataInfo(frames=9, height=32, width=32, fps=8.0, tokens_per_sample=1,
                train_flops_per_sample=1.0)


def loss_at(step: int) -> float:
    return 1.0 / step


def train(cfg: TrainConfig, run: str, start: int, val_at: int | None = None) -> None:
    """Rank 0's Monitor from `start` to cfg.steps, as t2v/train/worker.py drives it (one
    worker, a log every step), with a validation that writes RUN/samples/step_N/ at `val_at`."""
    monitor = Monitor(cfg, INFO, run, rank=0, world=1)
    monitor.start(start)
    engine = SimpleNamespace(get_global_grad_norm=lambda: 0.5, get_lr=lambda: [1e-3])
    for step in range(start + 1, cfg.steps + 1):
        monitor.got_batch(2)
        monitor.add_loss(torch.tensor(loss_at(step)))
        monitor.step_done(step, engine)
        if step == val_at:
            frames = np.zeros((9, 32, 32, 3), np.uint8)
            v = Validation({"flow_loss": 0.25}, clips={"00": frames}, sheet=frames[0],
                           captions=["a red circle"])
            monitor.validated(step, record_validation(run, step, v, fps=8.0))
    monitor.close()


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores too
    return MlflowClient(tracking_uri=uri)


def steps_of(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_mlflow_file_store_holds_config_metrics_samples_and_a_resume_continues_it(
        tmp_path, monkeypatch):
    """tracker=mlflow, no URI: the driver picks RUN/mlruns; the run gets the config as params,
    every metric at its step, config.yaml and the validation folder; a resume with more steps
    (a restart that repeats a logged step) reopens the same run and logs no step twice."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = str(tmp_path / "unit")
    cfg = tracking.check_tracker(TrainConfig(name="unit", out=str(tmp_path), tracker="mlflow",
                                             steps=3, log_every=1), run)
    assert cfg.tracker_uri == (tmp_path / "unit" / "mlruns").as_uri()
    storage.write_text(storage.join(run, "config.yaml"), "steps: 3\n")
    train(cfg, run, start=0, val_at=3)

    run_id = json.loads(Path(run, "tracker.json").read_text())["mlflow"]["run_id"]
    client = mlflow_client(cfg.tracker_uri)
    got = client.get_run(run_id)
    assert (got.info.run_name, got.info.status) == ("unit", "FINISHED")
    params = got.data.params
    assert params["steps"] == "3" and params["tracker"] == "mlflow"
    assert float(params["optim.lr"]) == cfg.optim.lr and params["tracker_uri"] == cfg.tracker_uri
    assert steps_of(client, run_id, "train/loss") == [1, 2, 3]
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == pytest.approx(
        [loss_at(s) for s in (1, 2, 3)])
    assert steps_of(client, run_id, "val/flow_loss") == [3]
    assert {"train/lr", "train/samples_per_s", "train/eta_s"} <= set(got.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "samples"}
    assert {a.path for a in client.list_artifacts(run_id, "samples/step_000003")} == {
        f"samples/step_000003/{n}" for n in ("00.mp4", "00.gif", "sheet.png", "captions.json")}

    # Resumed from a step-2 checkpoint after an attempt that had logged and validated step 3.
    more = cfg.model_copy(update={"steps": 5, "log_every": 1})
    train(more, run, start=2, val_at=3)
    assert json.loads(Path(run, "tracker.json").read_text())["mlflow"]["run_id"] == run_id
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert len(client.search_runs([got.info.experiment_id])) == 1
    assert steps_of(client, run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert steps_of(client, run_id, "val/flow_loss") == [3]
    assert got.data.params["steps"] == "3"  # MLflow params are fixed once logged


def test_a_failing_tracker_is_warned_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """An MLflow server that is down at the start, and a store that fails in mid-run: one line
    each, no exception, and TensorBoard and metrics.jsonl still get every step."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = str(tmp_path / "down")
    down = TrainConfig(name="down", out=str(tmp_path), tracker="mlflow", steps=2, log_every=1,
                       tracker_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens
    train(down, run, start=0)
    out = capsys.readouterr().out
    assert out.count("[t2v] tracker mlflow failed (start: ") == 1, out
    assert "training goes on" in out and not Path(run, "tracker.json").exists()
    rows = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert any(Path(run, "tb").iterdir())

    run = str(tmp_path / "flaky")
    flaky = down.model_copy(update={"name": "flaky", "tracker_uri": None, "steps": 4})
    calls = []

    def full_disk(self, values, step):
        calls.append(step)
        if step >= 2:
            raise OSError("No space left on device")

    monkeypatch.setattr(tracking.MLflow, "metrics", full_disk)
    train(tracking.check_tracker(flaky, run), run, start=0)
    out = capsys.readouterr().out
    assert calls == [1, 2]  # dropped after its failure
    assert out.count("[t2v] tracker mlflow failed") == 1, out
    assert "(log step 2: OSError: No space left on device)" in out
    rows = [json.loads(x) for x in Path(run, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def wandb_records(path: Path):
    """The protobuf records of a W&B run file (.wandb: LevelDB's log format, 32 KiB blocks of
    records with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, part = path.read_bytes(), 7, b""  # after the ":W&B" file header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # a block's padding
            pos += left
            continue
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            yield record


def test_wandb_offline_run_holds_config_metrics_samples_and_a_resume_continues_it(
        tmp_path, monkeypatch):
    """tracker=wandb with WANDB_MODE=offline: RUN/wandb/ holds one offline run file per attempt,
    both under the run id kept in RUN/tracker.json (`wandb sync` uploads them as one run)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = str(tmp_path / "unit")
    cfg = TrainConfig(name="unit", out=str(tmp_path), tracker="wandb", steps=3, log_every=1)
    storage.write_text(storage.join(run, "config.yaml"), "steps: 3\n")
    train(tracking.check_tracker(cfg, run), run, start=0, val_at=3)
    run_id = json.loads(Path(run, "tracker.json").read_text())["wandb"]["run_id"]
    train(cfg.model_copy(update={"steps": 5}), run, start=3)
    assert json.loads(Path(run, "tracker.json").read_text())["wandb"]["run_id"] == run_id
    wandb.teardown()  # offline, finish() returns before W&B's writer has flushed the file

    files = sorted(Path(run, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    steps, saved, config = [], set(), {}
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item}
                if "train/loss" in items:
                    steps.append(int(items["_step"]))
            elif kind == "files":
                saved |= {x.path for x in r.files.files}
            elif kind in ("config", "run"):  # W&B's first config comes with the run record
                update = r.config.update if kind == "config" else r.run.config.update
                config |= {i.key: i.value_json for i in update}
    assert steps == [1, 2, 3, 4, 5]
    assert {"t2v_config.yaml", "samples/step_000003/sheet.png",  # W&B has a config.yaml
            "samples/step_000003/00.mp4"} <= saved
    assert json.loads(config["steps"]) == 5 and json.loads(config["optim"])["lr"] == cfg.optim.lr


def test_a_tracker_not_installed_stops_the_driver_with_the_pip_command(tmp_path, monkeypatch):
    """Before Ray, before the data is even looked for; and an s3:// run needs an MLflow URI."""
    monkeypatch.setattr(tracking, "find_spec", lambda name: None)
    missing = TrainConfig(out=str(tmp_path), tracker="mlflow",
                          data={"shards": str(tmp_path / "no-such-shards")})
    with pytest.raises(ValueError, match=r"^tracker=mlflow needs its client, which is not "
                                         r"installed: pip install mlflow-skinny "):
        run_train(missing)
    monkeypatch.undo()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s3 = TrainConfig(out="s3://bucket/runs", tracker="mlflow")
    with pytest.raises(ValueError, match="set tracker_uri"):
        tracking.check_tracker(s3, "s3://bucket/runs/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.check_tracker(s3, "s3://bucket/runs/run").tracker_uri == "http://mlflow:5000"
    given = s3.model_copy(update={"tracker_uri": "http://other:5000"})
    assert tracking.check_tracker(given, "s3://b/r").tracker_uri == "http://other:5000"
    monkeypatch.chdir(tmp_path)  # a plain path: absolute, for rank 0 runs elsewhere
    given = s3.model_copy(update={"tracker_uri": "shared/mlruns"})
    assert tracking.check_tracker(given, "s3://b/r").tracker_uri == (
        tmp_path / "shared" / "mlruns").as_uri()


def test_debug_run_is_tracked_in_mlflow(debug_run):
    """The session's `ray job submit` run (tracker=mlflow, no URI: the driver chose RUN/mlruns)
    holds the config, steps 1-4 with metrics.jsonl's values, the step-4 validation and its
    videos and sheet."""
    pytest.importorskip("mlflow")
    run = Path(debug_run.out, "debug")
    uri = (run / "mlruns").as_uri()
    run_id = json.loads((run / "tracker.json").read_text())["mlflow"]["run_id"]
    client = mlflow_client(uri)
    got = client.get_run(run_id)
    assert (got.info.run_name, got.info.status) == ("debug", "FINISHED")
    assert got.data.params["model"] == "debug" and got.data.params["tracker_uri"] == uri
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert steps_of(client, run_id, "val/flow_loss") == [4]
    assert {"samples/step_000004/00.mp4", "samples/step_000004/sheet.png"} <= {
        a.path for a in client.list_artifacts(run_id, "samples/step_000004")}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run_id)}

