"""`ray job submit` for real: the session's `ray start --head` cluster runs jobs/train.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from t2v import storage

ROOT = Path(__file__).resolve().parents[1]


def submit(cmd: list[str], timeout: int, temp_dir: str = "") -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard's job agent is still starting up."""
    deadline = time.time() + 180
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            import glob

            logs = "".join(open(f).read()[-4000:] for f in glob.glob(
                f"{temp_dir}/session_latest/logs/dashboard_agent*.log"))
            Path("/tmp/t2v-job-submit.log").write_text(r.stdout + "\n----\n" + r.stderr
                                                       + "\n----\n" + logs)
            return r
        time.sleep(3)


def test_ray_job_submit_trains_and_exports(ray_cluster, train_latents, debug_vae_package,
                                           tmp_path):
    out = tmp_path / "runs"  # absolute: Ray runs the job in its own copy of the working dir
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(ROOT), "--", sys.executable, "jobs/train.py",
           "--config", "jobs/configs/debug.yaml", f"out={out}", f"data.shards={train_latents}",
           f"vae={debug_vae_package}", "val_samples=0"]
    r = submit(cmd, timeout=600, temp_dir=ray_cluster.temp_dir)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", r.stdout + r.stderr).group(1)
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_cluster.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "[train] step 4/4" in r.stdout
    meta = json.loads((out / "debug" / "package" / "model.json").read_text())
    assert meta["run"]["step"] == 4 and meta["dit"]["in_channels"] == 4
    assert storage.exists(str(out / "debug" / "package" / "dit.safetensors"))


def test_ray_job_refuses_relative_output(ray_cluster, train_latents, debug_vae_package):
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", ray_cluster.dashboard,
           "--working-dir", str(ROOT), "--", sys.executable, "jobs/train.py",
           "--config", "jobs/configs/debug.yaml", "out=runs/relative",
           f"data.shards={train_latents}", f"vae={debug_vae_package}"]
    r = submit(cmd, timeout=300, temp_dir=ray_cluster.temp_dir)
    assert r.returncode != 0
    assert "absolute path or an s3:// URI" in r.stdout + r.stderr
