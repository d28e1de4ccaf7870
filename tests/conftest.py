"""Session-wide real components: one moto S3 server and one local Ray instance for all tests."""

from __future__ import annotations

import os

import pytest

from tests.s3_fixtures import moto_s3, s3_bucket  # noqa: F401

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Ray's object store for the whole session. Small on purpose: the streaming test proves the
# reader stays inside it while reading a data set several times larger.
OBJECT_STORE_BYTES = 128 * 2**20


@pytest.fixture(scope="session")
def ray_local(moto_s3):  # noqa: F811 - moto first: Ray workers inherit the S3 endpoint env
    """A local Ray instance with 4 logical CPUs on this 2-core machine.

    More logical CPUs than cores so that a consumer, Ray Data tasks and actors can all be
    scheduled at once (NOTES-stack: 1-CPU workers on 2 CPUs starve Ray Data).
    """
    import ray

    ray.init(num_cpus=4, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory):
    """A small synthetic data set on local disk, shared by the data tests (read-only)."""
    from t2v.cli import run_synth
    from t2v.config import SynthConfig

    out = str(tmp_path_factory.mktemp("shapes"))
    run_synth(SynthConfig(out=out, num=24, frames=9, size=32, shard_size=10, seed=11))
    return out
