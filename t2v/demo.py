"""`t2v demo`, the README's first command.

Today: synthesise a shapes data set (with a held-out set of colour x shape x motion combinations
kept out of it) and stream it back through Ray Data into torch batches, printing what was read.
Training, rendering and evaluation join this same command as they land.
"""

from __future__ import annotations

import time

from t2v import storage
from t2v.config import DemoConfig, save_resolved
from t2v.data.synthetic import heldout_combos


def run_demo(cfg: DemoConfig) -> dict:
    from t2v.cli import run_synth
    from t2v.data.streaming import video_stream
    from t2v.runtime import check_output_uri, ensure_ray

    t0 = time.time()
    check_output_uri(cfg.out)
    heldout = [str(c) for c in heldout_combos(12)]
    synth = cfg.synth.model_copy(update={"out": storage.join(cfg.out, "shards"),
                                         "exclude": sorted(set(cfg.synth.exclude) | set(heldout))})
    save_resolved(cfg.model_copy(update={"synth": synth}), storage.join(cfg.out, "config.yaml"))
    print(f"[demo] 1/2 synthesising {synth.num} clips ({synth.frames}x{synth.size}x{synth.size}),"
          f" {len(heldout)} combinations held out", flush=True)
    made = run_synth(synth)

    print("[demo] 2/2 streaming the shards back through Ray Data", flush=True)
    ensure_ray(cfg.ray_address, num_cpus=cfg.num_cpus)
    reader = cfg.reader.model_copy(update={"shards": synth.out})
    stream = video_stream(reader)
    n, first, t1 = 0, None, time.time()
    for batch in stream.iter_batches(reader.batch_size):
        if first is None:
            first = batch
            v = batch.video
            print(f"[demo] batch: video {tuple(v.shape)} {v.dtype} in [{v.min():.2f}, "
                  f"{v.max():.2f}]; first caption: {batch.captions[0]!r}", flush=True)
        n += len(batch.keys)
    rate = n / max(time.time() - t1, 1e-9)
    skipped = len(stream.skipped())
    print(f"[demo] read {n} clips from {stream.num_shards} shards ({rate:.1f} clips/s), "
          f"skipped {skipped}", flush=True)
    return {"out": cfg.out, "synthesised": made["samples"], "read": n, "skipped": skipped,
            "heldout": heldout, "seconds": round(time.time() - t0, 1)}
