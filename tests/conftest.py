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
from tests.training_data import write_debug_vae_package, write_train_latents, write_train_raw

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default, and starting, checkpointing
# and finishing each wait for a poll: ~10 s per run on this 2-core machine (measured). Set
# before `ray start`, so jobs and the Train actors inherit it too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each node's log monitor globs its log folder every 0.1 s until the folder holds 1000 files,
# every 0.5 s after: the session's ~210 worker processes leave ~650 files; at 718 files the
# 0.1 s globbing cost 9.3 % of a core against 3.9 % at 0.5 s (AVX2 EPYC; the suite's log
# monitors took 85 CPU-s there). A new worker's lines reach a driver up to 0.5 s later, none
# lost. Set before `ray start`, like the line above.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Ray Train starts a PreemptionWatcher actor in every run, which asks the nodes every 5 s
# whether the cloud is taking one back (spot instances): ~2.2 CPU-s a run to start, and the
# session's local nodes are never preempted (tests/benchmarks/bench_startup.py, AVX2 EPYC:
# 28.8 -> 27.2 s and 49.4 -> 46.4 CPU-s a run). Off for this cluster only; users' runs keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Ray's object store per node. Small on purpose: the streaming test proves the reader stays
# inside the stores while reading a data set several times larger than all of them.
OBJECT_STORE_BYTES = 128 * 2**20
NODE2_OBJECT_STORE_BYTES = 128 * 2**20


ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(ROOT / "jobs" / "configs" / "debug.yaml")
# On top of jobs/configs/debug.yaml for every training test's run: caption dropout exercised,
# workers spread over both nodes, a failure is a failure (the fault test sets its own).
RUN_OVERRIDES = ["caption_dropout=0.25", "alt_caption_prob=0.5", "placement_strategy=SPREAD",
                 "max_failures=0"]


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


CLUSTER_MARK = "T2V_TEST_CLUSTER"
"""Set (to the cluster's temp dir) in the environment a test cluster is started with: every Ray
process inherits it, also those whose command line is only a title (ray::DashboardAgent)."""


def own_processes(temp: str, gcs: str | None = None) -> list:
    """The processes of one test cluster, and only those (`ray stop` would end every Ray on the
    machine): marked with CLUSTER_MARK=temp, or naming `temp` (session/log dirs) or the GCS port
    (the Ray client server names the GCS by the machine's IP even when the head was started on
    127.0.0.1) on their command line; and their children."""
    import re

    import psutil

    port = re.compile(rf"^--address=.*:{gcs.rpartition(':')[2]}$") if gcs else None
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "environ"]):
        args, env = p.info["cmdline"] or [], p.info["environ"] or {}
        if p.pid != os.getpid() and (env.get(CLUSTER_MARK) == temp or any(
                temp in a or (port is not None and port.match(a)) for a in args)):
            found[p.pid] = p
    for p in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return [p for p in found.values() if p.pid != os.getpid()]


def stop_processes(temp: str, gcs: str | None = None) -> list:
    """Stop one test cluster's processes; returns those still running afterwards (none)."""
    import psutil

    mine = own_processes(temp, gcs)
    for p in mine:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # The GCS and node 2's raylet ignore SIGTERM for their whole grace period (15 s measured):
    # the session is over, so 3 s is enough before SIGKILL.
    _, alive = psutil.wait_procs(mine, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return own_processes(temp, gcs)


def pytest_addoption(parser):
    parser.addoption("--chaos", action="store_true", default=False,
                     help="also run the long chaos scenarios (tests/chaos, marked chaos_full)")


def pytest_collection_modifyitems(config, items):
    """Tests marked `last` run after all others (the secrets scan reads what they wrote)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)  # stable


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
           "DS_ACCELERATOR": "cpu", CLUSTER_MARK: temp}
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
        left = stop_processes(temp, cluster.address)  # also matches node 2's "{temp}n2"
        # NOTES-stack: a custom --temp-dir leaves this file and later ray.init() would try it.
        Path(temp, "ray_current_cluster").unlink(missing_ok=True)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(temp + "n2", ignore_errors=True)
    assert not left, f"processes of the session's Ray cluster still running: {left}"


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
    run_synth(SynthConfig(out=out, num=24, frames=9, size=32, shard_size=10, seed=11,
                          alt_captions=True))
    return out


@pytest.fixture(scope="session")
def debug_vae_package(tmp_path_factory):
    """A VAE-only package of the debug preset (random weights, fitted latent stats)."""
    return write_debug_vae_package(str(tmp_path_factory.mktemp("vae-pkg")))


@pytest.fixture(scope="session")
def render_package(tmp_path_factory) -> str:
    """A render package: debug DiT + VAE + MiniLM (text length 16), the DiT's zero-init output
    layers randomised so seeds matter, render geometry 9x32x32 (the render and chaos tests)."""
    import torch

    from t2v.models.dit import VideoDiT, dit_config
    from t2v.models.package import RenderDefaults, save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, vae_config

    torch.manual_seed(0)
    dit = VideoDiT(dit_config("debug", in_channels=4))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02)
    uri = str(tmp_path_factory.mktemp("render-pkg"))
    save_package(uri, vae=CausalVideoVAE(vae_config("debug")), dit=dit,
                 text=TextEncoderConfig(max_length=16), run={"stage": "test"},
                 render=RenderDefaults(frames=9, height=32, width=32, fps=8.0))
    return uri


@pytest.fixture(scope="session")
def wan_folder(tmp_path_factory):
    """A tiny random Wan 2.1 T2V diffusers folder (tests/test_wan_import.py `make_wan_folder`:
    WanPipeline's layout, Wan's UniPC scheduler), shared read-only by the Wan tests."""
    pytest.importorskip("diffusers")
    from tests.test_wan_import import make_wan_folder

    return make_wan_folder(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny-Diffusers")


@pytest.fixture(scope="session")
def wan_package(wan_folder, tmp_path_factory) -> str:
    """`wan_folder` imported (`t2v import --wan`), shared read-only."""
    from t2v.models.wan_import import run_import_command
    from tests.test_wan_import import import_config

    out = tmp_path_factory.mktemp("wan-pkg")
    run_import_command(import_config(wan_folder, out))
    return str(out)


@pytest.fixture(scope="session")
def wan_lora_run(ray_local, train_raw, wan_package, tmp_path_factory):
    """A LoRA fine-tune of `wan_package` (rank 4, alpha 8, every linear layer of the blocks):
    3 steps on 2 Ray Train workers from RAW shards encoded in the workers (imported VAE + umT5,
    the clips' alternative captions too) at 5x16x16, ZeRO-2, activation checkpointing,
    validation at step 3; exported unmerged.
    (run dir, package), shared read-only by test_lora and test_wan_export."""
    from t2v.config import TrainConfig
    from t2v.train.trainer import run_train

    runs = tmp_path_factory.mktemp("wan-lora")
    lora = {"rank": 4, "alpha": 8.0, "merge_on_export": False,
            "target_modules": ["qkv", "q", "kv", "out", "ffn.fc1", "ffn.fc2"]}
    cfg = TrainConfig.model_validate(dict(
        stage="dit", name="lora", out=str(runs), init_from=wan_package, vae=wan_package,
        steps=3, batch_size=2, num_workers=2, cpus_per_worker=0.5, zero_stage=2,
        activation_checkpointing=True, log_every=1, ckpt_every=3, val_every=3, val_samples=1,
        val_steps=2, max_failures=0, caption_dropout=0.25, alt_caption_prob=0.5,
        optim={"lr": 1e-2}, lora=lora,
        data={"shards": train_raw, "encode_on_the_fly": True, "text_max_length": 16,
              "frames": 5, "size": 16}))
    result = run_train(cfg)
    assert result["step"] == 3
    return runs / "lora", str(result["package"])


@pytest.fixture(scope="session")
def train_raw(tmp_path_factory):
    """Raw shards behind `train_latents`: 5 clips in shards of 2 (the last one held out)."""
    return write_train_raw(str(tmp_path_factory.mktemp("train-raw")))


@pytest.fixture(scope="session")
def train_latents(ray_local, train_raw, debug_vae_package, tmp_path_factory):
    """Latent shards for training tests: 2 training shards of 2 clips + 1 held-out shard.

    4 training samples = one global batch of 2 workers x 2, so every optimizer step sees the
    same whole set whichever worker gets which sample: ZeRO stages, gradient accumulation and
    resumed runs can then be compared step by step.
    """
    return write_train_latents(train_raw, debug_vae_package,
                               str(tmp_path_factory.mktemp("train-latents")))


def submit_job(cmd: list[str], timeout: int, temp_dir: str = "") -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the dashboard's job agent is still starting up; what it
    printed (and the agent's log tail) also lands in /tmp/t2v-job-submit.log for a failure."""
    deadline = time.time() + 180
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            logs = "".join(p.read_text()[-4000:] for p in Path(temp_dir).glob(
                "session_latest/logs/dashboard_agent*.log")) if temp_dir else ""
            Path("/tmp/t2v-job-submit.log").write_text(r.stdout + "\n----\n" + r.stderr
                                                       + "\n----\n" + logs)
            return r
        time.sleep(3)


@dataclass
class DebugRun:
    out: str  # the runs root: the run is out/debug
    package: str
    job: subprocess.CompletedProcess  # what `ray job submit` printed and returned


@pytest.fixture(scope="session")
def debug_run(ray_cluster, train_latents, debug_vae_package, tmp_path_factory):
    """THE trained debug model package of the session, made as a user makes one: `ray job
    submit -- python jobs/train.py --config jobs/configs/debug.yaml ...` on the session cluster
    (ZeRO-2, 2 workers, 4 steps on `train_latents`, uninterrupted, tracked in MLflow's file
    store in RUN/mlruns). The job tests check the submission, the training tests compare every
    other run with its losses, tests/test_tracking.py reads its MLflow run."""
    out = str(tmp_path_factory.mktemp("runs"))  # absolute: the job runs in a copy of the repo
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
           ray_cluster.dashboard, "--working-dir", str(ROOT), "--", sys.executable,
           "jobs/train.py", "--config", "jobs/configs/debug.yaml", f"out={out}",
           f"data.shards={train_latents}", f"vae={debug_vae_package}", *RUN_OVERRIDES,
           "tracker=mlflow"]
    job = submit_job(cmd, timeout=600, temp_dir=ray_cluster.temp_dir)
    assert job.returncode == 0, (job.stdout[-3000:], job.stderr[-3000:])
    return DebugRun(out=out, package=str(Path(out, "debug", "package")), job=job)
