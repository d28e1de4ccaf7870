"""`t2v encode`: raw shards -> latent shards (DESIGN.md "Latent shards"), on a Ray Data actor pool.

The VAE and the text encoder are loaded once per actor (`EncodeShard.__init__`), never per
shard, and each caption is encoded once per actor (`CaptionCache`). One raw shard becomes one
latent shard of the same name, so resuming is a matter of existence: the driver skips shards whose
output tar and `_parts/NAME.json` record exist and were made with the same package hash, text
encoder and clip settings; a finished job starts no actor at all. Clips that cannot be used
(corrupt, too short, no caption) are skipped with their reason and counted; `_index.json` is
written last, from the part records, and marks the latent data set complete.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
import zlib
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch

from t2v import storage
from t2v.config import EncodeConfig
from t2v.configfile import save_resolved
from t2v.data.latents import EMPTY_CAPTION, LATENT_FORMAT, empty_caption_bytes
from t2v.data.shards import (
    iter_tar_samples,
    other_captions,
    shard_uris,
    write_index,
    write_shard,
)
from t2v.data.tensors import to_model_range
from t2v.data.video import VideoDecodeError, decode_video
from t2v.models.package import PackageError, PackageMeta, load_package, package_hash, read_meta
from t2v.models.text import PromptTooLongError, TextEncoder, TextEncoderConfig
from t2v.runtime import check_output_uri, ensure_ray, job_rows

log = logging.getLogger("t2v.encode")

PARTS_DIR = "_parts"
REPORT_NAME = "encode_report.json"
MiB = 1 << 20
CAPTION_CACHE_BYTES = 512 * MiB
"""Per-actor cap on cached caption embeddings (a umT5 caption at L=512, D=4096 is 4 MiB)."""
TEXT_BATCH = 64
"""Captions per text-encoder forward."""


class SkipSample(ValueError):
    """A sample the encoder cannot use; the message is the reason recorded in the report."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def resolve_text_config(base: TextEncoderConfig, cfg: EncodeConfig) -> TextEncoderConfig:
    """The package's text encoder, with the job's overrides of reference and length."""
    return base.overridden(cfg.text_encoder, cfg.text_max_length)


def usable_frames(available: int, temporal_down: int) -> int:
    """The longest 1 + k * temporal_down clip that `available` frames can make (>= 1)."""
    return 1 + (available - 1) // temporal_down * temporal_down


class CaptionCache:
    """Caption -> (embedding float16 (L, D), mask uint8 (L,)), least recently used out first.

    Captions repeat a lot (templates, re-cut clips of one video): each is encoded once per actor.
    """

    def __init__(self, max_bytes: int = CAPTION_CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.hits = self.encoded = 0

    def get(self, caption: str) -> tuple[np.ndarray, np.ndarray] | None:
        item = self.items.get(caption)
        if item is not None:
            self.items.move_to_end(caption)
        return item

    def put(self, caption: str, item: tuple[np.ndarray, np.ndarray]) -> None:
        self.items[caption] = item
        self.bytes += item[0].nbytes + item[1].nbytes
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, (emb, mask) = self.items.popitem(last=False)
            self.bytes -= emb.nbytes + mask.nbytes


@dataclass
class Clip:
    """A decoded raw sample waiting for its latent."""

    key: str
    frames: np.ndarray | None
    """uint8 (T, H, W, 3), T = 1 + 4k; dropped once encoded (a shard of them is gigabytes)."""
    caption: str
    meta: dict
    latent: np.ndarray | None = None
    """float16 (C, T', H', W'), once encoded."""
    alternatives: tuple[str, ...] = ()
    """Other captions of the clip (its json `captions`), e.g. shorter ones."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.meta["frames"], self.meta["height"], self.meta["width"]


class EncodeShard:
    """Ray Data actor: one row {"name": shard name} -> one written latent shard and its record."""

    def __init__(self, cfg: EncodeConfig, settings: dict) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        package = load_package(cfg.vae, device=self.device, load_text=False, load_dit=False)
        if package.vae is None:
            raise PackageError(f"{cfg.vae}: the package has no VAE")
        if package.hash != settings["vae_hash"]:  # a record must say what made its shard
            raise PackageError(f"{cfg.vae}: the package changed while the job ran (hash "
                               f"{package.hash[:12]}, planned {settings['vae_hash'][:12]})")
        self.vae = package.vae.eval().requires_grad_(False)
        self.text_config = resolve_text_config(package.meta.text, cfg)
        self.text = TextEncoder(self.text_config).to(self.device)
        self.cache = CaptionCache()
        self.settings = settings
        # What training gives a dropped caption (latents.EMPTY_CAPTION): every actor writes the
        # same bytes, atomically, so whichever lands last is as good as the first.
        with torch.no_grad():
            emb, mask = self.text([""])
        storage.write_bytes(storage.join(cfg.out, EMPTY_CAPTION), empty_caption_bytes(
            emb[0].float().cpu().numpy(), mask[0].cpu().numpy()))

    # ---- one sample

    def _clip(self, key: str, fields: dict[str, bytes]) -> Clip:
        cfg, vcfg = self.cfg, self.vae.config
        try:
            meta = json.loads(fields["json"]) if "json" in fields else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        caption = fields["txt"].decode("utf-8", "replace").strip() if "txt" in fields else ""
        caption = caption or str(meta.get("caption") or "").strip()
        if not caption:
            raise SkipSample("no caption (txt member)")
        try:
            alternatives = tuple(other_captions(meta, caption))
        except ValueError as e:
            raise SkipSample(str(e)) from None
        if not fields.get("mp4"):
            raise SkipSample("no mp4 member")
        try:  # the record names shard and key; the reason need not repeat them
            frames = decode_video(fields["mp4"], num_frames=cfg.frames, size=cfg.size)
        except VideoDecodeError as e:
            raise SkipSample(f"undecodable video: {_line(e)}") from None
        t, h, w = frames.shape[:3]
        if cfg.frames is not None and t < cfg.frames:
            raise SkipSample(f"too short: {t} < {cfg.frames} frames")
        if h % vcfg.spatial_down or w % vcfg.spatial_down:
            raise SkipSample(f"size {h}x{w} is not a multiple of spatial_down="
                             f"{vcfg.spatial_down} (set size=)")
        frames = frames[:usable_frames(t, vcfg.temporal_down)]  # the VAE takes 1 + 4k frames
        # What was encoded; `bucket` names it as pack does (frames x height x width): training
        # batches samples of one bucket together.
        meta |= {"frames": frames.shape[0], "height": h, "width": w,
                 "bucket": f"{frames.shape[0]}x{h}x{w}"}
        return Clip(key, frames, caption, meta, alternatives=alternatives)

    @torch.no_grad()
    def _encode_videos(self, clips: list[Clip], generator: torch.Generator) -> None:
        """One batch of clips of one shape -> their float16 latents (C, T', H', W')."""
        batch = np.stack([c.frames for c in clips])  # (B, T, H, W, 3) uint8
        x = to_model_range(torch.from_numpy(batch).to(self.device))  # (B, 3, T, H, W)
        z = self.vae.encode_latents(x, sample=self.cfg.sample, generator=generator)
        for clip, latent in zip(clips, z.half().cpu().numpy(), strict=True):  # (C, T', H', W')
            clip.latent, clip.frames = latent, None

    def _encode_captions(self, captions: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Unique captions -> (text float16 (L, D), mask uint8 (L,)); cached ones are free.

        A caption the encoder refuses (too long with truncate off) is left out of the result.
        """
        found, new = {}, []
        for caption in dict.fromkeys(captions):
            item = self.cache.get(caption)
            if item is None:
                new.append(caption)
            else:
                found[caption] = item
        self.cache.hits += len(captions) - len(new)
        for s in range(0, len(new), TEXT_BATCH):
            chunk = new[s:s + TEXT_BATCH]
            try:
                found |= self._run_text(chunk)
            except PromptTooLongError:  # find the offenders one by one; encode the rest
                for caption in chunk:
                    try:
                        found |= self._run_text([caption])
                    except PromptTooLongError:
                        pass
        return found

    def _run_text(self, captions: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        emb, mask = self.text(captions)  # (B, L, D) float, (B, L) bool
        self.cache.encoded += len(captions)
        out = {}
        for caption, e, m in zip(captions, emb.half().cpu().numpy(),
                                 mask.to(torch.uint8).cpu().numpy(), strict=True):
            out[caption] = (e, m)
            self.cache.put(caption, (e, m))
        return out

    def _fields(self, clip: Clip, texts: dict[str, tuple[np.ndarray, np.ndarray]],
                alternatives: list[str], source: str) -> dict[str, bytes]:
        latent, text = clip.latent, texts[clip.caption]
        meta = {**clip.meta, "key": clip.key, "caption": clip.caption, "source_key": clip.key,
                "source_shard": source, "latent_shape": list(latent.shape), "vae": self.cfg.vae,
                "vae_hash": self.settings["vae_hash"], "text_encoder": self.text_config.ref,
                "text_max_length": self.text_config.max_length, "sampled": self.cfg.sample}
        fields = {"latent.npy": npy_bytes(latent), "text.npy": npy_bytes(text[0]),
                  "mask.npy": npy_bytes(text[1]), "txt": clip.caption.encode(),
                  "json": json.dumps(meta).encode()}
        if alternatives:  # (K, L, D) and (K, L): what training's alt_caption_prob draws from
            fields["text_alt.npy"] = npy_bytes(np.stack([texts[a][0] for a in alternatives]))
            fields["mask_alt.npy"] = npy_bytes(np.stack([texts[a][1] for a in alternatives]))
        return fields

    # ---- one shard

    def __call__(self, row: dict) -> dict:
        cfg, name = self.cfg, str(row["name"])
        source, target = storage.join(cfg.src, name), storage.join(cfg.out, name)
        t0, hits0, encoded0 = time.time(), self.cache.hits, self.cache.encoded
        skipped: list[dict] = []
        clips: list[Clip] = []
        pending: dict[tuple[int, int, int], list[Clip]] = {}  # same-shape clips batch together
        generator = torch.Generator(self.device).manual_seed(zlib.crc32(name.encode()))
        with storage.local_copy(source) as path:
            try:
                for key, fields in iter_tar_samples(path):
                    try:
                        clip = self._clip(key, fields)
                    except SkipSample as e:
                        skipped.append({"shard": name, "key": key, "reason": _line(e)})
                        continue
                    clips.append(clip)
                    pending.setdefault(clip.shape, []).append(clip)
                    if len(pending[clip.shape]) == cfg.batch_size:
                        self._encode_videos(pending.pop(clip.shape), generator)
            except (tarfile.TarError, EOFError) as e:  # the tar itself is cut or corrupt
                skipped.append({"shard": name, "key": "*", "reason": f"unreadable tar: {_line(e)}"})
        for group in pending.values():
            self._encode_videos(group, generator)
        texts = self._encode_captions([c.caption for c in clips]
                                      + [a for c in clips for a in c.alternatives])
        samples, masks, buckets = [], [], Counter()
        for clip in clips:
            reason = _unusable(clip, texts)
            if reason:
                skipped.append({"shard": name, "key": clip.key, "reason": reason})
                continue
            alternatives = usable_alternatives(clip, texts)
            samples.append((clip.key, self._fields(clip, texts, alternatives, source)))
            masks += [texts[c][1] for c in (clip.caption, *alternatives)]
            buckets[clip.meta["bucket"]] += 1
        n = write_shard(target, samples) if samples else 0
        record = {"name": name, "samples": n, "buckets": dict(sorted(buckets.items())),
                  "skipped": skipped, "settings": self.settings,
                  "text_dim": self.text.dim, "text_tokens": text_tokens(masks),
                  "latent_shapes": sorted({json.dumps(list(c.latent.shape)) for c in clips}),
                  "captions_encoded": self.cache.encoded - encoded0,
                  "caption_cache_hits": self.cache.hits - hits0,
                  "seconds": round(time.time() - t0, 3)}
        storage.write_text(storage.join(cfg.out, PARTS_DIR, name + ".json"), json.dumps(record))
        return {"record": json.dumps(record)}


def _unusable(clip: Clip, texts: dict[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
    """Why an encoded clip cannot go into the shard, or None. float16 tops out at 65504."""
    if clip.caption not in texts:
        return "caption too long for the text encoder (truncate is off)"
    if not np.isfinite(clip.latent).all():
        return "non-finite latent (float16 overflow?)"
    if not np.isfinite(texts[clip.caption][0]).all():
        return "non-finite text embedding (float16 overflow?)"
    return None


def usable_alternatives(clip: Clip, texts: dict[str, tuple[np.ndarray, np.ndarray]],
                        ) -> list[str]:
    """The clip's alternative captions that encoded to finite values (one too long for the
    encoder is left out, not the clip)."""
    return [a for a in clip.alternatives if a in texts and np.isfinite(texts[a][0]).all()]


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- driver


def check_encode_config(cfg: EncodeConfig) -> PackageMeta:
    """Refuse what would fail in every actor, before any actor starts (cheap: model.json only)."""
    for field in ("src", "out", "vae"):
        if not getattr(cfg, field):
            raise ValueError(f"encode needs {field}=URI")
    src, out = cfg.src.rstrip("/"), cfg.out.rstrip("/")
    if out == src or out.startswith(src + "/"):
        raise ValueError(f"out={cfg.out!r} is inside src={cfg.src!r}: latent shards would be "
                         "read back as raw shards; write them elsewhere")
    meta = read_meta(cfg.vae)
    if meta.vae is None:
        raise PackageError(f"{cfg.vae}: the package has no VAE of its own "
                           f"(vae_ref={meta.vae_ref!r})")
    if cfg.frames is not None and (cfg.frames - 1) % meta.vae.temporal_down:
        raise ValueError(f"frames={cfg.frames} must be 1 + {meta.vae.temporal_down}k for this VAE")
    if cfg.size is not None and cfg.size % meta.vae.spatial_down:
        raise ValueError(f"size={cfg.size} must be a multiple of spatial_down="
                         f"{meta.vae.spatial_down} for this VAE")
    return meta


def encode_settings(cfg: EncodeConfig, meta: PackageMeta) -> dict:
    """What an output shard depends on besides its input: a part record with other settings is
    stale, and its shard is encoded again."""
    return {"vae_hash": package_hash(cfg.vae),
            "text_encoder": resolve_text_config(meta.text, cfg).to_dict(),
            "frames": cfg.frames, "size": cfg.size, "sample": cfg.sample}


def done_record(cfg: EncodeConfig, name: str, settings: dict, existing: set[str]) -> dict | None:
    """The part record of a shard that needs no work, else None."""
    part_uri = storage.join(cfg.out, PARTS_DIR, name + ".json")
    if part_uri not in existing:
        return None
    record = json.loads(storage.read_text(part_uri))
    if record.get("settings") != settings:
        return None
    return record if record["samples"] == 0 or storage.join(cfg.out, name) in existing else None


def _rel(root: str, uri: str) -> str:
    return uri[len(root.rstrip("/")) + 1:]


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode `cfg.src` into latent shards at `cfg.out`; returns the report (also written)."""
    meta = check_encode_config(cfg)
    t0 = time.time()
    save_resolved(cfg, storage.join(cfg.out, "encode_config.yaml"))  # also a preflight write
    names = [_rel(cfg.src, u) for u in shard_uris(cfg.src)]
    if not names:
        raise storage.StorageError(f"{cfg.src}: no shard-*.tar found")
    settings = encode_settings(cfg, meta)
    # Resume is decided here, so a finished job starts no actor (no VAE, no text encoder load).
    existing = set(storage.list_prefix(cfg.out))
    with ThreadPoolExecutor(16) as pool:  # one GET per part record: overlap them
        done = list(pool.map(lambda n: done_record(cfg, n, settings, existing), names))
    records = [r for r in done if r is not None]
    todo = [n for n, r in zip(names, done, strict=True) if r is None]
    if records:
        print(f"[encode] {len(records)}/{len(names)} shards already done (resumed)", flush=True)
    fresh: list[dict] = []
    if todo:
        lo, hi = cfg.concurrency
        log.info("encode: %d of %d shards in %s -> %s, %d-%d actors", len(todo), len(names),
                 cfg.src, cfg.out, lo, hi)
        ds = ray.data.from_items([{"name": n} for n in todo], override_num_blocks=len(todo))
        ds = ds.map(EncodeShard, fn_constructor_kwargs={"cfg": cfg, "settings": settings},
                    compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi,
                                                       max_tasks_in_flight_per_actor=2),
                    num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None)
        for row in job_rows(ds):
            rec = json.loads(row["record"])
            fresh.append(rec)
            clips = sum(r["samples"] for r in fresh)
            print(f"[encode] {rec['name']}: {rec['samples']} ok, {len(rec['skipped'])} skipped | "
                  f"{len(records) + len(fresh)}/{len(names)} shards, {clips} clips encoded, "
                  f"{clips / max(time.time() - t0, 1e-9):.2f} clips/s", flush=True)
    return _finish(cfg, settings, records + fresh, fresh, time.time() - t0)


def text_tokens(masks: list[np.ndarray]) -> int:
    """Width that holds every real token of these masks (L,): the last set position + 1 (not
    the count: a tokenizer that pads on the left keeps its tokens at the end)."""
    return max((int(np.flatnonzero(m)[-1]) + 1 for m in masks if m.any()), default=0)


def _finish(cfg: EncodeConfig, settings: dict, records: list[dict], fresh: list[dict],
            seconds: float) -> dict:
    """Report and index from the part records; the index is written last."""
    clips = sum(r["samples"] for r in fresh)
    skips = sorted((s for r in records for s in r["skipped"]),
                   key=lambda s: (s["shard"], s["key"]))
    # Samples per bucket of each shard: training sums its own shards' (shards.bucket_counts).
    shards = [{"name": r["name"], "samples": r["samples"], "buckets": r.get("buckets", {})}
              for r in records if r["samples"]]
    shapes = sorted({s for r in records for s in r["latent_shapes"]})
    buckets = Counter()
    for r in records:
        buckets.update(r.get("buckets", {}))
    vae = {"uri": cfg.vae, "hash": settings["vae_hash"]}
    report = {
        "src": cfg.src, "out": cfg.out, "vae": vae, "shards": len(shards),
        "resumed_shards": len(records) - len(fresh), "encoded": sum(s["samples"] for s in shards),
        "encoded_this_run": clips, "skipped": len(skips),
        "skip_reasons": dict(Counter(s["reason"].split(":")[0] for s in skips)),
        "captions_encoded": sum(r["captions_encoded"] for r in fresh),
        "caption_cache_hits": sum(r["caption_cache_hits"] for r in fresh),
        "clips_per_s": round(clips / max(seconds, 1e-9), 3), "seconds": round(seconds, 2),
        "buckets": dict(sorted(buckets.items())), "skips": skips,
    }
    storage.write_text(storage.join(cfg.out, REPORT_NAME), json.dumps(report, indent=1))
    text = settings["text_encoder"]
    # Positions past the longest caption's last token are padding in every sample: the reader
    # leaves them out of its blocks and the collate puts them back (t2v/data/latents.py). A part
    # record from before the field keeps the whole width.
    tokens = [r.get("text_tokens") for r in records if r["samples"]]
    extra = {"text_tokens": max(tokens)} if tokens and None not in tokens else {}
    if storage.exists(storage.join(cfg.out, EMPTY_CAPTION)):  # not from an older encode
        extra["empty_caption"] = EMPTY_CAPTION
    write_index(cfg.out, shards, format=LATENT_FORMAT, source=cfg.src, vae=vae,
                text_encoder=text, max_length=text["max_length"], **extra,
                text_dim=records[0]["text_dim"], latent_shapes=[json.loads(s) for s in shapes],
                frames=cfg.frames, size=cfg.size, sampled=cfg.sample, skipped=len(skips),
                buckets=dict(sorted(buckets.items())))
    return report


def run_encode_command(cfg: EncodeConfig) -> dict:
    """`t2v encode`: check the output location, join or start Ray, encode; report sans skip list."""
    check_output_uri(cfg.out)
    ensure_ray()
    report = run_encode(cfg)
    return {k: v for k, v in report.items() if k != "skips"}
