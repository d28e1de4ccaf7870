"""Chaos scenarios: faults caused from outside the code under test (SIGKILL from another process,
an S3 endpoint that throttles, resets and stalls, damaged data, hostile inputs).

Every scenario is marked `chaos`; the quick ones run in the default suite, those marked
`chaos_full` only with `--chaos` (`make chaos`; the option lives in tests/conftest.py), one by one with `-k`. Each scenario records what
it injected and what was lost in the ledger (`T2V_CHAOS_LEDGER`, JSON lines): `make chaos` turns
it into the table of RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import time

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "chaos: a fault caused from outside the code under test")
    config.addinivalue_line("markers", "chaos_full: a long chaos scenario (make chaos)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="long chaos scenario: make chaos (pytest --chaos)")
    for item in items:
        if "tests/chaos/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker("chaos")
            if "chaos_full" in item.keywords and not config.getoption("--chaos"):
                item.add_marker(skip)


@pytest.fixture
def ledger(request):
    """`ledger(fault=..., injected=n, survived=n, lost=...)` appends one row for this test."""
    path = os.environ.get("T2V_CHAOS_LEDGER")

    def record(**row) -> None:
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": request.node.name, "time": time.time(), **row})
                        + "\n")

    return record


@pytest.fixture(scope="session")
def chaos_latents(ray_local, debug_vae_package, tmp_path_factory) -> str:
    """20 clips in 5 latent shards of 4; the last is held out: 16 training samples, 4 steps a
    pass at a global batch of 4 (checkpoints and resumes land mid-pass)."""
    from t2v.config import EncodeConfig, SynthConfig
    from t2v.data.encode import run_encode
    from t2v.data.synthetic import run_synth

    raw = str(tmp_path_factory.mktemp("chaos-raw"))
    run_synth(SynthConfig(out=raw, num=20, frames=9, size=32, shard_size=4, seed=31))
    out = str(tmp_path_factory.mktemp("chaos-latents"))
    run_encode(EncodeConfig(src=raw, out=out, vae=debug_vae_package, batch_size=4))
    return out
