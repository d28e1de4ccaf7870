"""Joining or starting Ray, and the rules a job's paths must follow under `ray job submit`.

Thin orchestration only: models and maths never import this.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

from t2v import hub, storage

log = logging.getLogger("t2v")

# Forwarded to Ray workers so they reach the same object store as the driver. Credentials are
# deliberately NOT forwarded (they would show in the dashboard): on a cluster they come from the
# instance profile / service account, locally the workers inherit the driver's environment.
_FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_PROFILE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                "WANDB_MODE", "WANDB_DIR")
"""Settings (never secrets) a local Ray's workers take from the driver: where S3 is, the Hub
cache and offline switches (hf: ids resolve there), W&B's mode and directory."""


def under_ray_job() -> bool:
    """True inside the driver of a `ray job submit` entrypoint."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_output_uri(uri: str, what: str = "out") -> str:
    """Under a Ray job the working dir is Ray's temporary copy: refuse relative outputs."""
    if not uri:
        raise ValueError(f"{what}: an output location is required")
    if hub.is_hub(uri):
        raise ValueError(f"{what}={uri!r}: a Hugging Face Hub reference is read-only; give a "
                         "path or an s3:// URI")
    if under_ray_job() and not storage.is_s3(uri) and not os.path.isabs(uri):
        raise ValueError(
            f"{what}={uri!r} is relative; under `ray job submit` it would land in Ray's temporary "
            "copy of the working dir and vanish: give an absolute path or an s3:// URI")
    return uri


_LOCAL_SET: list[str] = []
"""Variables `ensure_ray` set for the local Ray it started; `disconnect_ray` takes them back
(Ray Train hands the driver's to every later run, a cluster's included)."""


def local_ray_defaults(environ: MutableMapping[str, str]) -> list[str]:
    """Settings for a Ray that t2v starts on this machine alone (set before it starts: its
    processes inherit them); a value the user set wins. Returns the names it set.

    No cloud takes a laptop's node back, so Ray Train's PreemptionWatcher (an actor each run
    starts, asking the nodes every 5 s whether a spot instance is going) has nothing to watch:
    it costs ~2 CPU-s a run to start (tests/benchmarks/bench_startup.py) and, like every Ray
    worker process, wakes ~150 times a second beside the training workers (BENCHMARKS.md,
    training overhead round 14). Runs on a cluster keep it."""
    wanted = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    added = [k for k in wanted if k not in environ]
    environ.update({k: wanted[k] for k in added})
    return added


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_memory: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS / a submitted job's cluster), else start a local Ray."""
    import ray  # noqa: PLC0415 - heavy: only where Ray starts
    from ray.data import DataContext  # noqa: PLC0415 - heavy: only where Ray starts

    # Ray Data's tqdm bars redraw with terminal escapes: in a log file or CI they are noise.
    # Our own progress lines (steps, clips/s, videos/s) remain.
    if not sys.stderr.isatty():
        DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address or under_ray_job():
        ray.init(address=address or "auto", **kwargs)
        log.info("joined Ray cluster at %s", address or "auto")
        return
    _LOCAL_SET[:] = local_ray_defaults(os.environ)
    # The dashboard (on 127.0.0.1 only) is where users watch jobs; Ray Train's clean-up actor
    # also polls its state API and logs a warning every few seconds without it.
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env={"env_vars": env} if env else None, **kwargs)
    log.info("started a local Ray instance (%s CPUs)", ray.cluster_resources().get("CPU"))


def ray_connected() -> bool:
    """Whether this process already holds a Ray connection (started or joined)."""
    import ray  # noqa: PLC0415 - heavy: only where Ray starts

    return ray.is_initialized()


def disconnect_ray() -> None:
    """Leave Ray (and stop the local instance this process started): nothing Ray forwards
    afterwards reaches this process's terminal."""
    import ray  # noqa: PLC0415 - heavy: only where Ray starts

    ray.shutdown()
    for name in _LOCAL_SET:  # a cluster joined later keeps its own settings
        os.environ.pop(name, None)
    _LOCAL_SET.clear()


def job_rows(ds):  # noqa: ANN001, ANN201 - a ray.data.Dataset -> its rows
    """The rows of a Ray Data job as they come; a storage failure inside one of its tasks (Ray
    wraps it in a task error and a traceback) ends the job as that one-line StorageError."""
    try:
        yield from ds.iter_rows()
    except Exception as e:  # noqa: BLE001 - unwrapped below, or re-raised as it was
        failure = storage.failure_in(e)
        if failure is None:
            raise
        raise failure from None
