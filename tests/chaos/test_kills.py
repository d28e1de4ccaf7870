"""Processes killed from outside: SIGKILL from this test process at random moments (the seed is
in every failure message; T2V_CHAOS_SEED replays one), never from a hook inside the code."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from t2v import storage
from t2v.render import manifest as mf
from tests.conftest import ROOT, own_processes
from tests.test_render import check_video, ok_rows

SEED = int(os.environ.get("T2V_CHAOS_SEED") or time.time_ns() % 2**31)


def wait_for(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (seed {SEED})")
        time.sleep(poll)


def cluster_processes(cluster, title: str) -> list[psutil.Process]:
    """The session cluster's processes whose title (Ray sets `ray::Actor.method`) has `title`."""
    found = []
    for p in own_processes(cluster.temp_dir, cluster.address):
        try:
            if title in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def sigkill(procs: list[psutil.Process]) -> int:
    n = 0
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
            n += 1
        except psutil.Error:
            continue
    return n


@pytest.mark.chaos_full
@pytest.mark.parametrize("where", ["local", "s3"])
def test_render_driver_and_actors_killed_three_times_then_every_prompt_once(
        where, ray_cluster, render_package, s3_bucket, tmp_path, ledger):
    """`t2v render` on the session cluster, three rounds: after k videos SIGKILL a renderer
    actor (Ray Data restarts it and resends its batch), after k more SIGKILL the driver (its
    actors go with it). The same command then finishes: one ok row per prompt in the whole
    manifest, every video whole, no temp file (S3: no object, no pending multipart upload)
    anywhere under --out."""
    rng = random.Random(f"{SEED}/{where}")
    n = 40  # a round renders ~8 (actor restarts included): some are left for each
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"killed shape {i}\n" for i in range(n)))
    out = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/render-kill"
    cmd = [sys.executable, "-m", "t2v.cli", "render", f"model={render_package}",
           f"prompts={prompts}", f"out={out}", "steps=2", "batch_size=2", "concurrency=1,2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    actor = "MapBatches(Renderer)"

    def videos() -> int:
        return len(storage.list_prefix(storage.join(out, "videos"), suffix=".mp4"))

    kills = {"actor": 0, "driver": 0}
    for round_ in range(3):
        log = open(tmp_path / f"round{round_}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            start = videos()
            k = rng.randint(1, 2)
            wait_for(lambda: videos() >= start + k or proc.poll() is not None, 180,  # noqa: B023
                     f"round {round_}: {k} videos")
            time.sleep(rng.uniform(0.0, 0.5))
            kills["actor"] += sigkill(cluster_processes(ray_cluster, actor)[:1])
            start = videos()
            k = rng.randint(1, 2)
            wait_for(lambda: videos() >= start + k or proc.poll() is not None, 180,  # noqa: B023
                     f"round {round_}: {k} more videos after the actor kill")
            time.sleep(rng.uniform(0.0, 0.5))
            assert proc.poll() is None, f"round {round_} finished before its kill (seed {SEED})"
            proc.send_signal(signal.SIGKILL)
            kills["driver"] += 1
        finally:
            proc.kill()
            proc.wait()
            log.close()
        # Ray ends a dead driver's actors; the next round starts without them.
        wait_for(lambda: not cluster_processes(ray_cluster, actor), 60, "the actors to go")
    assert kills == {"actor": 3, "driver": 3}, kills
    done_before = videos()
    assert done_before < n

    final = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    rows = ok_rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n, (SEED, len(ids), len(set(ids)))  # raw rows: no dup
    for row in rows:
        check_video(row)
    everything = storage.list_prefix(out)
    temps = [u for u in everything if storage.TMP_PREFIX in u.rsplit("/", 1)[1]]
    if where == "local":  # list_prefix lists files; a temp directory would show here
        temps += [str(p) for p in Path(out).rglob(f"{storage.TMP_PREFIX}*")]
    assert temps == [], (SEED, temps)
    assert sorted(u.rsplit("/", 1)[1] for u in storage.list_prefix(
        storage.join(out, "videos"))) == sorted(f"{i}.mp4" for i in ids)
    if where == "s3":
        bucket, prefix = storage.split_s3(out)
        pending = storage.s3_client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        assert not pending.get("Uploads"), (SEED, pending.get("Uploads"))
    ok, errors = mf.latest_rows(mf.read_manifest(out))
    assert len(ok) == n and not errors
    ledger(fault=f"SIGKILL render actor, then driver, 3 rounds ({where} out)",
           injected=sum(kills.values()), survived=sum(kills.values()), lost=0,
           note=f"seed {SEED}; {done_before}/{n} done before the clean rerun")
