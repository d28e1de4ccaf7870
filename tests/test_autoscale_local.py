"""Local autoscaling you can watch: cluster/local.yaml on Ray's fake multi-node provider.

A second, private Ray cluster (own GCS port, own ports, own temp dir) is started the way
cluster/README.md tells a user to start it; a driver asks for more one-CPU actors than the head
holds, so the autoscaler must add worker "nodes" (local raylets), and after the actors are gone
the idle timeout must remove them again. Nothing here touches the session cluster of conftest.py
or any other Ray on the machine: only processes that name this cluster are stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CLUSTER_MARK, stop_processes
from tests.s3_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
JOB = ROOT / "cluster" / "local_scale_job.py"
RAY = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.slow


def _monitor_events(temp: str) -> list[str]:
    """The autoscaler's own account (monitor.log ':event_summary:' lines), for the test log."""
    lines = []
    for log in {p.resolve() for p in Path(temp).glob("session_*/logs/monitor.log")}:
        lines += [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                  if ":event_summary:" in ln]
    return lines


def test_local_cluster_scales_up_then_down() -> None:
    t_start = time.monotonic()
    config = yaml.safe_load(LOCAL_YAML.read_text())
    head_cpus = int(config["available_node_types"]["ray.head.default"]["resources"]["CPU"])
    idle_s = 60 * float(config["idle_timeout_minutes"])
    assert idle_s <= 30, f"idle_timeout_minutes={config['idle_timeout_minutes']} is too slow to test"
    # The scale-down is the same with a shorter wait: 3 s instead of the shipped 12 s.
    config["idle_timeout_minutes"] = 0.05
    idle_s = 60 * config["idle_timeout_minutes"]

    temp = tempfile.mkdtemp(prefix="t2vas", dir="/tmp")  # short: Unix socket paths are limited
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config["provider"]["gcs_address"] = gcs  # the fake workers join this head, not :6379
    cfg_path = Path(temp, "local.yaml")
    cfg_path.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", CLUSTER_MARK: temp})
    head = [str(RAY), "start", "--head", f"--port={port}", f"--num-cpus={head_cpus}",
            f"--autoscaling-config={cfg_path}", f"--temp-dir={temp}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=false",
            "--object-store-memory=78643200", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            # Fixed defaults would collide with the session cluster: a free port for each.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    actors = head_cpus + 2  # two more than the head holds: two worker nodes are certain
    try:
        r = subprocess.run(head, env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        print(f"[{time.monotonic() - t_start:6.1f}s] head up at {gcs} (temp dir {temp})")

        job = subprocess.run(
            [sys.executable, str(JOB), "--address", gcs, "--actors", str(actors),
             "--timeout", str(idle_s + 60)],
            env=env, capture_output=True, text=True, timeout=idle_s + 150, cwd=ROOT)
        print(job.stdout)
        print("\n".join(_monitor_events(temp)))
        assert job.returncode == 0, f"job failed:\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
        summary = json.loads(job.stdout.strip().splitlines()[-1])

        assert summary["initial"] == 1, summary  # the head alone; min_workers are all 0
        assert summary["peak"] >= summary["initial"] + 2, summary  # nodes were added
        assert summary["actor_nodes"] >= 2, summary  # and the actors really ran on them
        assert summary["final"] == summary["initial"], summary  # and removed after idling
        events = " ".join(_monitor_events(temp))
        assert re.search(r"Adding \d+ node", events), events
        assert re.search(r"Removing \d+ nodes", events), events
    finally:
        left = stop_processes(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)
        print(f"[{time.monotonic() - t_start:6.1f}s] torn down")
    assert not left, f"processes of the local cluster still running: {[p.pid for p in left]}"
