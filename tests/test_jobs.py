"""`ray job submit` for real: the session's `ray start --head` cluster runs jobs/train.py.

The successful submission is the session's `debug_run` fixture (tests/conftest.py): the trained
debug package every training test compares with is made by this path.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from t2v import storage
from tests.conftest import ROOT, submit_job


@pytest.fixture(scope="session")
def refused_job(ray_cluster, train_latents, debug_vae_package) -> str:
    """A job with a relative output path, submitted with --no-wait just before `debug_run`
    (the tests below ask for this fixture first), so its driver starts beside that one's."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait",
           "--address", ray_cluster.dashboard, "--working-dir", str(ROOT), "--",
           sys.executable, "jobs/train.py", "--config", "jobs/configs/debug.yaml",
           "out=runs/relative", f"data.shards={train_latents}", f"vae={debug_vae_package}"]
    r = submit_job(cmd, timeout=300, temp_dir=ray_cluster.temp_dir)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return re.search(r"Job '(raysubmit_\w+)' submitted", r.stdout + r.stderr).group(1)


def test_ray_job_submit_trains_and_exports(ray_cluster, refused_job, debug_run):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = debug_run.job.stdout + debug_run.job.stderr
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    # The workers' progress reaches the user, each line once (Ray Train's print patch had
    # doubled every printed line: t2v.console.say).
    assert debug_run.job.stdout.count("[train] step 4/4") == 1
    assert debug_run.job.stdout.count("[t2v] rank 1/2: pid") == 1
    meta = json.loads(Path(debug_run.package, "model.json").read_text())
    assert meta["run"]["step"] == 4 and meta["dit"]["in_channels"] == 4
    assert storage.exists(str(Path(debug_run.package, "dit.safetensors")))


def test_ray_job_refuses_relative_output(ray_cluster, refused_job, debug_run):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard)
    deadline = time.time() + 120
    while not client.get_job_status(refused_job).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(refused_job) == JobStatus.FAILED
    assert "absolute path or an s3:// URI" in client.get_job_logs(refused_job)
