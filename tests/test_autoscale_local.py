"""Local autoscaling you can watch: cluster/local.yaml on Ray's fake multi-node provider.

A second, private Ray cluster (own GCS port, own ports, own temp dir) is started the way
cluster/README.md tells a user to start it; a driver asks for more one-CPU actors than the head
holds, so the autoscaler must add worker "nodes" (local raylets), and after the actors are gone
the idle timeout must remove them again. Nothing here touches the session cluster of conftest.py
or any other Ray on the machine: only processes that name this cluster are stopped.
"""

from __future__ import annotations

import contextlib
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

from tests.s3_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_YAML = ROOT / "cluster" / "local.yaml"
JOB = ROOT / "cluster" / "local_scale_job.py"
RAY = Path(sys.executable).with_name("ray")

pytestmark = pytest.mark.slow


def _own_processes(temp: str, gcs: str) -> list:
    """Processes of this cluster only: every one names its temp dir (session/log dirs) or, like
    the Ray client server, its GCS address; children of those are ours too. The client server
    names the GCS by the machine's IP even when the head was started on 127.0.0.1, so the
    address is matched by its port."""
    import psutil

    port = re.compile(rf"^--address=.*:{gcs.rpartition(':')[2]}$")
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        args = p.info["cmdline"] or []
        if any(temp in a or port.match(a) for a in args) and p.pid != os.getpid():
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _stop(temp: str, gcs: str) -> None:
    import psutil

    mine = _own_processes(temp, gcs)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # A test cluster has nothing to flush: a short grace period, then SIGKILL.
    _, alive = psutil.wait_procs(mine, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


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
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"})
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
        _stop(temp, gcs)
        left = _own_processes(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)
        print(f"[{time.monotonic() - t_start:6.1f}s] torn down")
    assert not left, f"processes of the local cluster still running: {[p.pid for p in left]}"
