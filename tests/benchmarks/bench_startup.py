"""Start-up of a Ray Train run: where a short `t2v train` spends its time before its first step
and after its last ([1/7] item 7: most of the test suite's time is this, not training).

    .venv/bin/python tests/benchmarks/bench_startup.py [--rounds 2] \\
        [--variants ",poll_s=2"] [--out FILE]

The tests' run: jobs/configs/debug.yaml (the debug DiT, 4 steps, checkpoints at steps 2 and 4,
2 workers, ZeRO-2, validation at step 4) on 5 synthetic clips encoded by a random debug VAE,
on a local Ray started here with 2 CPUs. Each round runs every variant in turn (KEY=VALUE
overrides joined by '+'; '' is the config as it is). For each run: seconds from `run_train`'s
call to the workers' start event (after the engine is built), from there to the exported
package (4 steps, 2 checkpoints, validation, export), and from the export to `run_train`'s
return; and the CPU seconds each kind of process spent during the run
(cpu_split.process_kind), sampled every 0.25 s (a process that lives less is missed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import by_kind, cpu_seconds  # noqa: E402

from t2v import storage  # noqa: E402
from t2v.config import TrainConfig  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402
from tests.training_data import (  # noqa: E402
    write_debug_vae_package,
    write_train_latents,
    write_train_raw,
)

ROOT = Path(__file__).resolve().parents[2]


def make_data(tmp: str) -> tuple[str, str]:
    """(latent shards, VAE package): the tests' `train_latents` / `debug_vae_package`."""
    raw = write_train_raw(f"{tmp}/raw")
    vae = write_debug_vae_package(f"{tmp}/vae")
    return write_train_latents(raw, vae, f"{tmp}/latents"), vae


class CpuByKind(threading.Thread):
    """Every process's CPU seconds while it runs (read every 0.25 s), summed by kind at
    `stop()` against the `baseline` reading taken before the run."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.last: dict[int, tuple[str, float]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            for pid, (kind, t) in cpu_seconds().items():
                if kind == "?" and pid in self.last:  # exiting: its command line is gone
                    kind = self.last[pid][0]
                self.last[pid] = (kind, t)
            if self.stopped.wait(0.25):
                return

    def stop(self, baseline: dict[int, tuple[str, float]]) -> dict[str, float]:
        self.stopped.set()
        self.join()
        return {k: round(v, 1) for k, v in by_kind(baseline, self.last, least=0.05).items()}


def one_run(out: str, shards: str, vae: str, variant: str, name: str) -> dict:
    from t2v.configfile import load_config
    from t2v.train.trainer import run_train

    over = [kv for kv in variant.split("+") if kv]
    cfg = load_config(TrainConfig, str(ROOT / "jobs/configs/debug.yaml"), [
        "caption_dropout=0.25", "alt_caption_prob=0.5", "placement_strategy=SPREAD",
        "max_failures=0", f"out={out}", f"name={name}", f"data.shards={shards}", f"vae={vae}",
        *over])
    baseline = cpu_seconds()
    sampler = CpuByKind()
    sampler.start()
    t0 = time.time()
    run_train(cfg)
    t1 = time.time()
    cpu = sampler.stop(baseline)
    run = storage.join(out, name)
    start = next(json.loads(x)["time"] for x in storage.read_text(
        storage.join(run, "metrics.jsonl")).splitlines() if '"event": "start"' in x)
    exported = os.path.getmtime(Path(run) / "package" / "model.json")
    return {"variant": variant or "(as configured)", "total_s": round(t1 - t0, 1),
            "to_first_step_s": round(start - t0, 1), "steps_to_export_s": round(exported - start, 1),
            "export_to_return_s": round(t1 - exported, 1), "cpu_s": cpu,
            "cpu_total_s": round(sum(cpu.values()), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="", help="runs separated by ',': '' or KEY=VALUE[+...]")
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    variants = args.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            shards, vae = make_data(tmp)
            for r in range(args.rounds):
                for i, v in enumerate(variants):
                    row = one_run(f"{tmp}/runs", shards, vae, v, f"r{r}v{i}") | {"round": r}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            ray.shutdown()
    print(f"\nmachine: {describe()}; the debug DiT, 4 steps, "
          "2 workers, ZeRO-2; medians over rounds")
    print("| variant | runs | total s | call -> first step | steps + val + export | export -> "
          "return | CPU s (all processes) |\n|---|---|---|---|---|---|---|")
    for v in variants:
        mine = [x for x in rows if x["variant"] == (v or "(as configured)")]
        med = {k: statistics.median(x[k] for x in mine) for k in (
            "total_s", "to_first_step_s", "steps_to_export_s", "export_to_return_s",
            "cpu_total_s")}
        print(f"| {v or '(as configured)'} | {len(mine)} | {med['total_s']:.1f} | "
              f"{med['to_first_step_s']:.1f} | {med['steps_to_export_s']:.1f} | "
              f"{med['export_to_return_s']:.1f} | {med['cpu_total_s']:.1f} |")
    last = rows[-len(variants):]
    for x in last:
        print(f"CPU s by process, last round, {x['variant']}: "
              + ", ".join(f"{k} {v}" for k, v in x["cpu_s"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
