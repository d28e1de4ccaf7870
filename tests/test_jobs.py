"""`ray job submit` for real: the session's `ray start --head` cluster runs jobs/train.py.

The successful submission is the session's `debug_run` fixture (tests/conftest.py): the trained
debug package every training test compares with is made by this path.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from t2v import storage
from tests.conftest import ROOT, submit_job


def test_ray_job_submit_trains_and_exports(ray_cluster, debug_run):
    out = debug_run.job.stdout + debug_run.job.stderr
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "[train] step 4/4" in debug_run.job.stdout  # the workers' progress reaches the user
    meta = json.loads(Path(debug_run.package, "model.json").read_text())
    assert meta["run"]["step"] == 4 and meta["dit"]["in_channels"] == 4
    assert storage.exists(str(Path(debug_run.package, "dit.safetensors")))


def test_ray_job_refuses_relative_output(ray_cluster, train_latents, debug_vae_package):
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(ROOT), "--", sys.executable, "jobs/train.py",
           "--config", "jobs/configs/debug.yaml", "out=runs/relative",
           f"data.shards={train_latents}", f"vae={debug_vae_package}"]
    r = submit_job(cmd, timeout=300, temp_dir=ray_cluster.temp_dir)
    assert r.returncode != 0
    assert "absolute path or an s3:// URI" in r.stdout + r.stderr
