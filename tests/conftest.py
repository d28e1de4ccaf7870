"""Session-wide real components: one moto S3 server and one local Ray instance for all tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3_fixtures import moto_s3, s3_bucket  # noqa: F401

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Ray's object store per node. Small on purpose: the streaming test proves the reader stays
# inside the stores while reading a data set several times larger than all of them.
OBJECT_STORE_BYTES = 128 * 2**20
NODE2_OBJECT_STORE_BYTES = 128 * 2**20


@dataclass
class RayCluster:
    address: str
    dashboard: str
    temp_dir: str
    env: dict


def _ray_cli(*args: str, env: dict) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    r = subprocess.run([str(ray_bin), *args], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _stop_processes_under(temp: str, gcs: str | None = None) -> None:
    """Stop this session's Ray processes only (`ray stop` would end every Ray on the machine).

    Every process of the cluster names its temp dir on its command line (session/log dirs),
    except the Ray client server, which names only the GCS address: `gcs` catches it.
    """
    import re

    import psutil

    # The address must not continue with a digit: 127.0.0.1:6379 is not 127.0.0.1:63791.
    marks = [re.escape(temp)] + ([re.escape(gcs) + r"(?!\d)"] if gcs else [])
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(re.search(m, arg) for arg in (p.info["cmdline"] or []) for m in marks)]
    mine = [p for p in mine if p.pid != os.getpid()]
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(mine, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture(scope="session")
def ray_cluster(moto_s3):  # noqa: F811 - moto first: Ray's processes inherit the S3 endpoint
    """ONE real Ray cluster for the whole session, started as a user starts one.

    `ray start --head` on 127.0.0.1 with the dashboard (for `ray job submit`), plus a second
    node (`ray start --address`) so multi-node placement (SPREAD) is real. 6 logical CPUs on
    this 2-core machine so that a consumer, Ray Data tasks and Train workers fit at once
    (NOTES-stack: 1-CPU workers on 2 CPUs starve Ray Data).
    """
    import ray

    from tests.s3_fixtures import free_port

    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="t2vray", dir="/tmp")  # short: Unix socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "DS_ACCELERATOR": "cpu"}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        # Fixed defaults (52365, ...) collide between the two nodes and with a cluster that is
        # still shutting down; every listening port of every node gets a free one instead.
        return [f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]

    _ray_cli("start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4",
             f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={temp}",
             f"--ray-client-server-port={free_port()}", *own_ports(), *common, env=env)
    cluster = RayCluster(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}",
                         temp_dir=temp, env=env)
    try:
        _ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                 f"--object-store-memory={NODE2_OBJECT_STORE_BYTES}", f"--temp-dir={temp}n2",
                 *own_ports(), *common, env=env)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        yield cluster
    finally:
        ray.shutdown()
        _stop_processes_under(temp, cluster.address)  # also matches node 2's "{temp}n2"
        # NOTES-stack: a custom --temp-dir leaves this file and later ray.init() would try it.
        Path(temp, "ray_current_cluster").unlink(missing_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp + "n2", ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(ray_cluster):
    """The `ray` module, connected to the session cluster (data and pack tests use this)."""
    import ray

    return ray


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A small synthetic data set on local disk, shared by the data tests (read-only)."""
    from t2v.config import SynthConfig
    from t2v.data.synthetic import run_synth

    out = str(tmp_path_factory.mktemp("shapes"))
    run_synth(SynthConfig(out=out, num=24, frames=9, size=32, shard_size=10, seed=11))
    return out


@pytest.fixture(scope="session")
def debug_vae_package(tmp_path_factory):
    """A VAE-only package of the debug preset (random weights, fitted latent stats)."""
    import torch

    from t2v.models.package import save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, fit_latent_stats, vae_config

    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config("debug")).eval()
    with torch.no_grad():
        shift, scale = fit_latent_stats(vae.encode(torch.rand(4, 3, 9, 32, 32) * 2 - 1).mean)
    vae.set_latent_stats(shift=shift, scale=scale)
    uri = str(tmp_path_factory.mktemp("vae-pkg"))
    save_package(uri, vae=vae, text=TextEncoderConfig(max_length=16), run={"stage": "test"})
    return uri


@pytest.fixture(scope="session")
def train_raw(tmp_path_factory):
    """Raw shards behind `train_latents`: 5 clips in shards of 2 (the last one held out)."""
    from t2v.config import SynthConfig
    from t2v.data.synthetic import run_synth

    raw = str(tmp_path_factory.mktemp("train-raw"))
    run_synth(SynthConfig(out=raw, num=5, frames=9, size=32, shard_size=2, seed=21))
    return raw


@pytest.fixture(scope="session")
def train_latents(ray_local, train_raw, debug_vae_package, tmp_path_factory):
    """Latent shards for training tests: 2 training shards of 2 clips + 1 held-out shard.

    4 training samples = one global batch of 2 workers x 2, so every optimizer step sees the
    same whole set whichever worker gets which sample: ZeRO stages, gradient accumulation and
    resumed runs can then be compared step by step.
    """
    from t2v.config import EncodeConfig
    from t2v.data.encode import run_encode

    out = str(tmp_path_factory.mktemp("train-latents"))
    run_encode(EncodeConfig(src=train_raw, out=out, vae=debug_vae_package, batch_size=4))
    return out
