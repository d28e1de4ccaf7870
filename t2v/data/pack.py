"""`t2v pack`: a user's folder or bucket prefix of videos + captions -> raw shards, on Ray Data.

The driver only lists files and plans which videos go into which shard (deterministic: sorted
paths, `shard_size` per shard); Ray Data tasks then decode, validate, normalise and write one
shard each, in parallel across the cluster. A video that cannot be used is skipped with its reason
in `pack_report.json`; every other video lands in exactly one shard. Rerunning skips shards whose
tar and part record exist, so an interrupted pack resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from pathlib import PurePosixPath

import ray

from t2v import storage
from t2v.config import PackConfig
from t2v.configfile import save_resolved
from t2v.data.buckets import choose_bucket, parse_buckets
from t2v.data.shards import check_captions, safe_key, shard_name, write_index, write_shard
from t2v.data.video import VideoDecodeError, decode_video, encode_mp4, probe_video
from t2v.runtime import check_output_uri, ensure_ray, job_rows

log = logging.getLogger("t2v.pack")

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")
PARTS_DIR = "_parts"


def _rel(root: str, uri: str) -> str:
    return uri[len(root.rstrip("/")) + 1:]


def load_captions(cfg: PackConfig, files: list[str]) -> dict[str, tuple[str, list[str]]]:
    """Relative video path -> (caption, alternative captions), from a captions.jsonl/.csv table
    (sidecars come later). A jsonl row may list other captions of the clip under `captions`
    (e.g. shorter ones): they go to the sample's json for TrainConfig.alt_caption_prob."""
    root = cfg.src.rstrip("/")
    table = cfg.captions
    if table is None:
        for name in ("captions.jsonl", "captions.csv"):
            candidate = storage.join(root, name)
            if candidate in files:
                table = candidate
                break
    if table is None:
        return {}
    text = storage.read_text(table)
    out: dict[str, tuple[str, list[str]]] = {}
    if table.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, caption = str(row["path"]), str(row["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{table}:{n}: expected {{\"path\", \"caption\"}}: {e}") from None
            try:
                out[path] = (caption, check_captions(row.get("captions", [])))
            except ValueError as e:
                raise ValueError(f"{table}:{n}: {e}") from None
    elif table.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{table}:1: header must have 'path' and 'caption' columns")
        for row in reader:
            out[row["path"]] = (row["caption"], [])
    else:
        raise ValueError(f"{table}: captions table must be .jsonl or .csv")
    return out


def plan_shards(cfg: PackConfig) -> tuple[list[dict], int]:
    """List the source and assign videos to shards. Returns (shard plans, videos found)."""
    root = cfg.src.rstrip("/")
    files = storage.list_prefix(root)
    if not files and not storage.is_s3(root) and not storage.local_path(root).is_dir():
        raise storage.StorageError(f"{cfg.src}: source folder does not exist")
    captions = load_captions(cfg, files)
    file_set = set(files)
    videos = sorted(f for f in files if f.lower().endswith(VIDEO_EXTS))
    items, seen = [], set()
    for uri in videos:
        rel = _rel(root, uri)
        key = safe_key(str(PurePosixPath(rel).with_suffix("")))
        if key in seen:  # "a/b.mp4" and "a_b.mp4" collide after sanitising
            key = f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        seen.add(key)
        sidecar = str(PurePosixPath(uri).with_suffix(".txt")) if not storage.is_s3(uri) else (
            uri.rsplit(".", 1)[0] + ".txt")
        caption, alternatives = captions.get(rel, (None, []))
        items.append({"uri": uri, "rel": rel, "key": key, "caption": caption,
                      "captions": alternatives, "sidecar": sidecar if sidecar in file_set else None})
    # Items travel as JSON text: Arrow would otherwise infer (and then clash on) nested schemas.
    plans = [{"index": i // cfg.shard_size, "items": json.dumps(items[i:i + cfg.shard_size])}
             for i in range(0, len(items), cfg.shard_size)]
    return plans, len(videos)


class PackShard:
    """One Ray Data row (a shard plan) -> one written shard and its record."""

    def __init__(self, cfg: PackConfig) -> None:
        self.cfg = cfg
        self.buckets = parse_buckets(cfg.buckets) if cfg.buckets else None

    def _decode_bucketed(self, data: bytes, info, uri: str):
        """(frames, bucket name): the clip decoded straight into its bucket's size and length.
        The header's frame count (rescaled to `fps`) picks the bucket; a clip that then decodes
        shorter (a header that overstates) is placed again by what it has."""
        fps = self.cfg.fps
        count = info.num_frames if not fps or not info.fps else int(info.num_frames * fps
                                                                     / info.fps)
        bucket = choose_bucket(max(count, 1), info.height, info.width, self.buckets)
        while True:
            frames = decode_video(data, fps=fps, num_frames=bucket.frames,
                                  size=(bucket.height, bucket.width), source=uri)
            if frames.shape[0] == bucket.frames:
                return frames, bucket.name
            bucket = choose_bucket(frames.shape[0], info.height, info.width, self.buckets)

    def _sample(self, item: dict) -> tuple[str, dict[str, bytes]]:
        cfg = self.cfg
        caption = item["caption"]
        if caption is None and item["sidecar"]:
            caption = storage.read_text(item["sidecar"]).strip()
        if not caption:
            raise ValueError("no caption (sidecar .txt or captions table)")
        data = storage.read_bytes(item["uri"])
        if not data:
            raise VideoDecodeError(f"{item['uri']}: empty file (0 bytes)")
        info = probe_video(data, source=item["uri"])
        bucket = None
        if self.buckets:
            frames, bucket = self._decode_bucketed(data, info, item["uri"])
        else:
            size = tuple(cfg.size) if cfg.size else None
            frames = decode_video(data, fps=cfg.fps, num_frames=cfg.frames, size=size,
                                  source=item["uri"])
        if frames.shape[0] < cfg.min_frames:
            raise ValueError(f"too short: {frames.shape[0]} frames < min_frames={cfg.min_frames}")
        fps = cfg.fps or info.fps
        meta = {"key": item["key"], "source": item["uri"], "caption": caption,
                **({"captions": item["captions"]} if item.get("captions") else {}),
                "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                "width": int(frames.shape[2]), "fps": fps, **({"bucket": bucket} if bucket else {}),
                "source_info": {"width": info.width, "height": info.height, "fps": info.fps,
                                "codec": info.codec, "duration": info.duration}}
        return item["key"], {"mp4": encode_mp4(frames, fps=fps, crf=cfg.crf),
                             "txt": caption.encode(), "json": json.dumps(meta).encode()}

    def __call__(self, plan: dict) -> dict:
        out = self.cfg.out
        name = shard_name(int(plan["index"]))
        part_uri = storage.join(out, PARTS_DIR, name + ".json")
        if storage.exists(part_uri):
            record = json.loads(storage.read_text(part_uri))
            if record["samples"] == 0 or storage.exists(storage.join(out, name)):
                return {"record": json.dumps(record), "resumed": True}
        t0 = time.time()
        samples, skipped, buckets = [], [], {}
        for item in json.loads(plan["items"]):
            try:
                sample = self._sample(item)
            except (VideoDecodeError, ValueError, storage.NotFound) as e:
                # A bad or vanished video is this clip's problem; any other storage error is
                # the store's: it fails the shard (nothing is written), and a rerun redoes it.
                skipped.append({"path": item["uri"], "reason": str(e).splitlines()[0]})
                continue
            samples.append(sample)
            bucket = json.loads(sample[1]["json"]).get("bucket")
            if bucket:
                buckets[bucket] = buckets.get(bucket, 0) + 1
        n = write_shard(storage.join(out, name), samples) if samples else 0
        record = {"name": name, "samples": n, "skipped": skipped, "seconds": time.time() - t0,
                  **({"buckets": buckets} if self.buckets else {})}
        storage.write_text(part_uri, json.dumps(record))
        return {"record": json.dumps(record), "resumed": False}


def run_pack(cfg: PackConfig) -> dict:
    """Pack `cfg.src` into shards at `cfg.out`; returns the report (also written beside them)."""
    if not cfg.src or not cfg.out:
        raise ValueError("pack needs src=URI and out=URI")
    t0 = time.time()
    save_resolved(cfg, storage.join(cfg.out, "pack_config.yaml"))  # also a preflight write
    plans, found = plan_shards(cfg)
    log.info("pack: %d videos in %s -> %d shards of <= %d", found, cfg.src, len(plans),
             cfg.shard_size)
    records: list[dict] = []
    if plans:
        ds = ray.data.from_items(plans, override_num_blocks=len(plans))
        ds = ds.map(PackShard(cfg), concurrency=cfg.concurrency)
        for row in job_rows(ds):
            rec = json.loads(row["record"])
            records.append(rec)
            print(f"[pack] {rec['name']}: {rec['samples']} ok, {len(rec['skipped'])} skipped"
                  f"{' (resumed)' if row['resumed'] else ''} | {len(records)}/{len(plans)} shards",
                  flush=True)
    skipped = [s for r in records for s in r["skipped"]]
    shards = [{"name": r["name"], "samples": r["samples"],
               **({"buckets": r["buckets"]} if "buckets" in r else {})}
              for r in records if r["samples"]]
    report = {"src": cfg.src, "found": found, "packed": sum(s["samples"] for s in shards),
              "skipped": len(skipped), "skips": sorted(skipped, key=lambda s: s["path"]),
              "shards": len(shards), "seconds": round(time.time() - t0, 2)}
    extra = {}
    if cfg.buckets:  # samples per bucket, every bucket listed (an empty one says so)
        counts = {b.name: 0 for b in parse_buckets(cfg.buckets)}
        for r in records:
            for name, n in r.get("buckets", {}).items():
                counts[name] += n
        report["buckets"] = extra["buckets"] = counts
        print("[pack] per bucket: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v),
              flush=True)
    storage.write_text(storage.join(cfg.out, "pack_report.json"), json.dumps(report, indent=1))
    write_index(cfg.out, shards, source=cfg.src, **extra)  # last: marks the data set complete
    return report


def run_pack_command(cfg: PackConfig) -> dict:
    """`t2v pack` / jobs/pack.py: check the output, join or start Ray, pack; the report without
    its per-file skip list (that is in OUT/pack_report.json)."""
    check_output_uri(cfg.out)
    ensure_ray()
    return {k: v for k, v in run_pack(cfg).items() if k != "skips"}
