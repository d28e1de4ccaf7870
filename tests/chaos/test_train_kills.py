"""Training processes SIGKILLed from outside at random moments: a non-zero rank, rank 0, the
rank writing a checkpoint in the middle of its upload (the S3 proxy pulls the trigger on the
upload's n-th request), and the driver of a `ray job submit` job.

After Ray Train's automatic restart (a worker lost) or the same command submitted again (the
driver lost), the run must finish with each step once in metrics.jsonl and in TensorBoard, at
most one checkpoint interval of work lost, every checkpoint directory left loadable, and every
step's loss equal to an uninterrupted run's on the same data. Two data sets: `epochs` (16
samples, 4 steps an epoch: checkpoints and resumes land mid-pass, so the resumed run must read
its pass again in the same order and pass over what it had taken) and `exact` (4 samples, one
global batch). The seed is in every failure message; T2V_CHAOS_SEED replays one.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from t2v import storage
from t2v.train import checkpoint
from t2v.train.trainer import run_train
from tests.chaos.test_kills import SEED, cluster_processes, wait_for
from tests.conftest import DEBUG_CONFIG, ROOT, RUN_OVERRIDES
from tests.s3_fixtures import copy_tree
from tests.test_train import config, losses

STEPS, EVERY = 12, 3
RUN = {"steps": STEPS, "ckpt_every": EVERY, "keep_checkpoints": 2, "val_samples": 0,
       "data.passes_per_read": 2}
"""16 training samples, global batch 4: 4 steps a pass, 3 passes, a checkpoint every 3 steps
(so a checkpoint lands mid-pass, and so does a resume); two passes per Ray Data execution (the
streams of steps 1-8 and 9-12: resumes land in the first or the second)."""


@pytest.fixture(scope="module")
def data(chaos_latents, train_latents) -> dict[str, str]:
    return {"epochs": chaos_latents, "exact": train_latents}


@pytest.fixture(scope="module")
def uninterrupted(data, debug_vae_package, tmp_path_factory):
    """kind -> the run every killed run on that data set is compared with: ZeRO-2, local,
    never interrupted (made on first use)."""
    runs: dict[str, str] = {}

    def reference(kind: str) -> str:
        if kind not in runs:
            out = str(tmp_path_factory.mktemp(f"chaos-ref-{kind}"))
            result = run_train(config(out, "ref", data[kind], debug_vae_package,
                                      max_failures=0, **RUN))
            assert result["step"] == STEPS
            runs[kind] = storage.join(out, "ref")
            assert len(losses(runs[kind])) == STEPS
        return runs[kind]

    return reference


class Driver:
    """`python jobs/train.py ...` (or `ray job submit -- ...`) with its output read as it comes:
    the workers' `[t2v] rank R/W: pid P` lines say which process is which rank."""

    RANK = re.compile(r"\[t2v\] rank (\d+)/\d+: pid (\d+)")

    def __init__(self, cmd: list[str], env: dict) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def rank_pids(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for line in list(self.lines):
            if m := self.RANK.search(line):
                found[int(m[1])] = int(m[2])
        return found

    def steps(self, pattern: str) -> list[int]:
        """The step numbers in distinct lines matching `pattern` (Ray may print a worker's line
        twice)."""
        return [int(m[1]) for line in dict.fromkeys(self.lines) if (m := re.search(pattern, line))]

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            self.reader.join(timeout=10)
        return rc

    def tail(self, n: int = 60) -> str:
        return "".join(self.lines[-n:])


def latest_step(run: str) -> int:
    try:
        return max(losses(run), default=0)
    except (storage.StorageError, json.JSONDecodeError, FileNotFoundError):
        return 0


def train_args(out: str, name: str, shards: str, vae: str, zero: int) -> list[str]:
    return ["jobs/train.py", "--config", DEBUG_CONFIG, f"out={out}", f"name={name}",
            f"data.shards={shards}", f"vae={vae}", *RUN_OVERRIDES, "max_failures=3",
            f"zero_stage={zero}", *(f"{k}={v}" for k, v in RUN.items())]


def check_run(run: str, reference: str, restored: list[int], killed_at: int,
              tmp_path: Path) -> None:
    """The properties every killed run must have once finished."""
    rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl"))
            .splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), (  # each once, in order
        SEED, [(r.get("event") or ("loss" if "loss" in r else "val"), r["step"]) for r in rows])
    got = losses(run)
    assert all(math.isfinite(v) for v in got.values()), (SEED, got)
    want = losses(reference)
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5), (SEED, s, got[s], want[s])
    starts = [r["step"] for r in rows if r.get("event") == "start"]
    assert starts == [0, *restored], (SEED, starts, restored)
    assert all(killed_at - r <= EVERY for r in restored), (SEED, killed_at, restored)
    for c in checkpoint.run_checkpoints(run):  # none half written, every one loads
        assert c.complete, (SEED, c)
        saved, pieces = checkpoint.open_uri(c.uri)
        pieces.close()
        assert saved["step"] % EVERY == 0 or saved["step"] == STEPS
    tb = tmp_path / "tb"
    for uri in storage.list_prefix(storage.join(run, "tb")):
        storage.download_file(uri, tb / uri.rsplit("/", 1)[1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    shown = [e.step for e in events.Scalars("train/loss")]
    assert shown == list(range(1, STEPS + 1)), (SEED, shown)  # no step twice in TensorBoard


@pytest.mark.chaos_full
@pytest.mark.parametrize("rank,zero,where,kind", [
    (1, 2, "local", "epochs"), (0, 3, "s3", "exact"), (1, 3, "local", "exact"),
    (0, 2, "s3", "epochs")])
def test_worker_killed_at_a_random_step_restarts_and_matches(
        rank, zero, where, kind, ray_cluster, data, uninterrupted, debug_vae_package,
        s3_bucket, tmp_path, ledger):
    rng = random.Random(f"{SEED}/{rank}/{zero}/{where}/{kind}")
    shards, out = data[kind], str(tmp_path / "runs")
    if where == "s3":
        shards, out = copy_tree(shards, f"{s3_bucket}/latents"), f"{s3_bucket}/runs"
    run = storage.join(out, "killed")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    d = Driver([sys.executable, *train_args(out, "killed", shards, debug_vae_package, zero)],
               env)
    try:
        k = rng.randint(2, STEPS - 3)
        wait_for(lambda: latest_step(run) >= k or d.proc.poll() is not None, 300,
                 f"step {k}")
        time.sleep(rng.uniform(0.0, 0.6))
        pid = d.rank_pids()[rank]
        killed_at = latest_step(run)
        os.kill(pid, signal.SIGKILL)
        assert d.finish() == 0, (SEED, d.tail())
    finally:
        d.proc.kill()
    restored = d.steps(r"restored step (\d+)") or [0]  # killed before the first checkpoint
    assert len(restored) == 1, (SEED, restored, d.tail())
    check_run(run, uninterrupted(kind), restored, killed_at, tmp_path)
    ledger(fault=f"SIGKILL rank {rank} at a random step (ZeRO-{zero}, {where}, {kind})",
           injected=1,
           survived=1, lost=0, note=f"seed {SEED}: killed at step ~{killed_at}, restored "
                                     f"{restored[0]}, {killed_at - restored[0]} steps redone")


@pytest.mark.chaos_full
@pytest.mark.parametrize("zero,kind", [(2, "epochs"), (3, "exact")])
def test_rank_killed_mid_checkpoint_upload_restarts_from_the_one_before(
        zero, kind, ray_cluster, data, uninterrupted, debug_vae_package, moto_s3, s3_bucket,
        tmp_path, ledger):
    """The S3 proxy sees the checkpoint's objects arrive; on the n-th checkpoint's j-th object
    it SIGKILLs a rank before the object is stored: that checkpoint stays incomplete."""
    rng = random.Random(f"{SEED}/upload/{zero}")
    shards = copy_tree(data[kind], f"{s3_bucket}/latents")
    out = f"{s3_bucket}/runs"
    run = storage.join(out, "upload")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    d = Driver([sys.executable, *train_args(out, "upload", shards, debug_vae_package, zero)],
               env)
    nth, jth, rank = rng.randint(2, 3), rng.randint(1, 2), rng.randint(0, 1)
    seen: dict[str, int] = {}
    fired: list[int] = []

    def watch(request) -> None:
        m = re.search(r"/runs/upload/(checkpoint_[^/]+)/", request.path)
        if fired or request.method not in ("PUT", "POST") or not m:
            return
        seen.setdefault(m[1], 0)
        seen[m[1]] += 1
        if len(seen) == nth and seen[m[1]] == jth:
            fired.append(latest_step(run))
            os.kill(d.rank_pids()[rank], signal.SIGKILL)

    moto_s3.proxy.watch = watch
    try:
        wait_for(lambda: fired or d.proc.poll() is not None, 300, "the upload kill")
        assert fired, (SEED, d.tail())
        assert d.finish() == 0, (SEED, d.tail())
    finally:
        moto_s3.proxy.watch = None
        d.proc.kill()
    restored = d.steps(r"restored step (\d+)")
    assert restored == [(nth - 1) * EVERY], (SEED, nth, restored, d.tail())
    check_run(run, uninterrupted(kind), restored, fired[0], tmp_path)
    ledger(fault=f"SIGKILL rank {rank} mid checkpoint upload (ZeRO-{zero}, S3, {kind})",
           injected=1,
           survived=1, lost=0, note=f"seed {SEED}: checkpoint {nth}, object {jth}; restored "
                                     f"{restored[0]}")


@pytest.mark.chaos_full
def test_job_driver_killed_then_resubmitted_resumes_and_matches(
        ray_cluster, data, uninterrupted, debug_vae_package, tmp_path, ledger):
    """`ray job submit -- python jobs/train.py ...`; its driver process SIGKILLed at a random
    step (the job fails, its workers go with it); the same submission again finishes."""
    from tests.conftest import submit_job

    rng = random.Random(f"{SEED}/driver")
    out = str(tmp_path / "runs")
    run = storage.join(out, "driver")
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
           ray_cluster.dashboard, "--working-dir", str(ROOT), "--", sys.executable,
           *train_args(out, "driver", data["epochs"], debug_vae_package, 2)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    first = Driver(cmd, env)
    try:
        k = rng.randint(2, STEPS - 3)
        wait_for(lambda: latest_step(run) >= k or first.proc.poll() is not None, 400,
                 f"step {k}")
        time.sleep(rng.uniform(0.0, 0.6))
        drivers = [p for p in cluster_processes(ray_cluster, "jobs/train.py")  # not `sh -c`
                   if p.cmdline()[:2] == [sys.executable, "jobs/train.py"]]
        assert len(drivers) == 1, (SEED, drivers)
        killed_at = latest_step(run)
        drivers[0].send_signal(signal.SIGKILL)
        assert first.finish(timeout=120) != 0, (SEED, first.tail())  # the job failed
    finally:
        first.proc.kill()
    wait_for(lambda: not cluster_processes(ray_cluster, "RayTrainWorker"), 60,
             "the dead driver's workers to go")
    again = submit_job(cmd, timeout=600, temp_dir=ray_cluster.temp_dir)
    assert again.returncode == 0, (SEED, again.stdout[-3000:], again.stderr[-2000:])
    restored = sorted({int(m[1]) for m in re.finditer(r"resumed at step (\d+)", again.stdout)}
                      ) or [0]  # killed before the first checkpoint: starts again
    assert len(restored) == 1, (SEED, again.stdout[-3000:])
    check_run(run, uninterrupted("epochs"), restored, killed_at, tmp_path)
    ledger(fault="SIGKILL the driver of a `ray job submit` job, resubmit (epochs)", injected=1,
           survived=1, lost=0, note=f"seed {SEED}: killed at step ~{killed_at}, resumed at "
                                     f"{restored[0]}")
