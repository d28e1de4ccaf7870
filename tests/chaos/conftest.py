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
