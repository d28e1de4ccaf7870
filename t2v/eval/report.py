"""`t2v eval`: how well rendered videos follow their prompts, plus the model's own numbers.

Inputs: a render job's output (manifest + videos) and the prompt file it rendered, whose rows
carry the ground truth in `meta` ({"colour", "shape", "motion"[, "count"]}, the shapes
vocabulary). Optionally the model package and held-out raw shards, for the VAE's reconstruction
PSNR and compression ratio and the DiT's held-out flow loss at fixed t.

Outputs under OUT (default RENDERS/eval): report.json, rows.jsonl (one line per video: truth,
prediction, pass), contact_sheet.png (a row per prompt) and gifs/ID.gif. Nothing is dropped: a
prompt with no video is a failed row marked "missing"; an undecodable video is a failed row
with its error.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from t2v import storage
from t2v.config import EvalConfig
from t2v.data.shards import iter_shard_samples, shard_uris
from t2v.data.synthetic import COLOURS, MOTIONS, SHAPES
from t2v.data.tensors import to_model_range, to_uint8
from t2v.data.video import VideoDecodeError, decode_video, to_gif, to_png
from t2v.diffusion.flow import heldout_flow_loss
from t2v.eval.detector import detect
from t2v.eval.scoring import by_group, judge, shuffled_control, summarize
from t2v.eval.sheet import eval_sheet
from t2v.models.package import load_package
from t2v.render.manifest import SUMMARY_NAME, latest_rows, read_manifest
from t2v.render.prompts import PromptRules, parse_prompts, prompt_format

VOCAB = {"colour": list(COLOURS), "shape": list(SHAPES), "motion": list(MOTIONS),
         "count": ["1", "2"]}
TRUTH_KEYS = ("colour", "shape", "motion", "count")


def load_truth(prompts_uri: str) -> list[dict]:
    """The prompt rows that carry ground truth: [{"id", "prompt", "meta"}], file order."""
    # Lenient rules: eval only needs ids, prompts and meta; shapes were checked at render time.
    rules = PromptRules(temporal_down=1, spatial_multiple=1)
    parsed = parse_prompts(storage.read_bytes(prompts_uri), prompt_format(prompts_uri), rules,
                           source=prompts_uri)
    rows = [{"id": r.id, "prompt": r.prompt, "meta": r.meta} for r in parsed.rows
            if any(k in r.meta for k in TRUTH_KEYS)]
    if not rows:
        raise ValueError(f"{prompts_uri}: no row has ground truth in `meta` "
                         f"(keys {', '.join(TRUTH_KEYS)})")
    return rows


def _truth(meta: dict) -> dict:
    return {k: meta[k] for k in TRUTH_KEYS if k in meta}


def score_videos(cfg: EvalConfig, out: str) -> tuple[list[dict], list, list, list]:
    """Detect and judge every video of every ground-truth prompt; GIFs on the way. Returns the
    rows, the contact sheet's videos, the truth rows and each row's Detection (None: missing or
    undecodable), for the controls."""
    truth_rows = load_truth(cfg.prompts)
    ok, errors = latest_rows(read_manifest(cfg.renders))
    by_prompt: dict[str, list[dict]] = {}
    for row in ok.values():
        by_prompt.setdefault(row.get("prompt_id") or row["id"], []).append(row)
    render_errors = {e.get("prompt_id") or e.get("id"): e.get("error") for e in errors}
    rows, sheet_videos, detections, t0 = [], [], [], time.time()
    for i, tr in enumerate(truth_rows):
        truth, split = _truth(tr["meta"]), split_of(tr["meta"])
        videos = sorted(by_prompt.get(tr["id"], []), key=lambda r: r.get("sample") or 0)
        if not videos:
            err = render_errors.get(tr["id"], "no video rendered")
            rows.append({"id": tr["id"], "prompt_id": tr["id"], "prompt": tr["prompt"],
                         "status": "missing", "error": err, "truth": truth,
                         "split": split, "verdict": judge(None, truth),
                         "detection": None})
            detections.append(None)
            sheet_videos.append(None)
        for v in videos:
            uri = v["video"] if "://" in v["video"] or v["video"].startswith("/") else \
                storage.join(cfg.renders, v["video"])
            try:
                frames = decode_video(storage.read_bytes(uri), source=uri)
            except (VideoDecodeError, storage.StorageError) as e:
                rows.append({"id": v["id"], "prompt_id": tr["id"], "prompt": tr["prompt"],
                             "status": "error", "error": str(e).splitlines()[0],
                             "truth": truth, "split": split,
                             "verdict": judge(None, truth), "detection": None})
                detections.append(None)
                continue
            det = detect(frames)
            rows.append({"id": v["id"], "prompt_id": tr["id"], "prompt": tr["prompt"],
                         "status": "ok", "error": None, "truth": truth,
                         "split": split, "verdict": judge(det, truth),
                         "detection": det.to_dict(), "seconds": v.get("seconds"),
                         "video": uri})
            detections.append(det)
            if cfg.gifs:
                storage.write_bytes(storage.join(out, "gifs", f"{v['id']}.gif"),
                                    to_gif(frames, fps=v.get("fps") or 8.0))
            if v is videos[0]:
                sheet_videos.append((len(rows) - 1, frames))
        if (i + 1) % 50 == 0 or i + 1 == len(truth_rows):
            print(f"[eval] scored {i + 1}/{len(truth_rows)} prompts ({len(rows)} videos, "
                  f"{time.time() - t0:.0f}s)", flush=True)
    return rows, sheet_videos, truth_rows, detections


def split_of(meta: dict) -> str:
    """Which prompts a row belongs to: "heldout" (combinations kept out of training: the
    headline numbers; also rows that do not say) or "train" (combinations seen in training:
    memorisation next to composition)."""
    return "train" if meta.get("split") == "train" else "heldout"


def _heldout_clips(uri: str, n: int, temporal_down: int,
                   spatial: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """Up to n held-out clips uint8 (N, T, H, W, 3) cut to 1 + k*temporal_down frames and a
    multiple of the VAE's spatial factor, with their captions and ground truth (the sample's
    json: colour, shape, motion, count; {} when it has none)."""

    clips, captions, truths = [], [], []
    for key, fields in iter_shard_samples(shard_uris(uri)):
        video = next((fields[k] for k in ("mp4", "webm", "mkv", "avi", "mov") if k in fields), None)
        if video is None:
            continue
        try:
            frames = decode_video(video, source=f"{uri}:{key}")
        except VideoDecodeError:
            continue
        t = 1 + (frames.shape[0] - 1) // temporal_down * temporal_down
        h, w = (s // spatial * spatial for s in frames.shape[1:3])
        clips.append(frames[:t, :h, :w])
        captions.append(fields.get("txt", b"").decode())
        try:
            meta = json.loads(fields.get("json") or b"{}")
        except ValueError:
            meta = {}
        truths.append(_truth(meta) if isinstance(meta, dict) else {})
        if len(clips) == n:
            break
    if not clips:
        raise ValueError(f"{uri}: no decodable held-out clip")
    shapes = {c.shape for c in clips}
    keep = [i for i, c in enumerate(clips) if c.shape == clips[0].shape]  # one batch shape
    if len(shapes) > 1:
        print(f"[eval] held-out clips of {len(shapes)} shapes; using the {len(keep)} of "
              f"{clips[0].shape}", flush=True)
    return (np.stack([clips[i] for i in keep]), [captions[i] for i in keep],
            [truths[i] for i in keep])


def detector_ceiling(clips: np.ndarray, recon: torch.Tensor, truths: list[dict]) -> dict:
    """What the detector reads off the held-out clips themselves and off their VAE
    reconstructions, judged against the clips' ground truth: the most a rendered video can
    score (the DiT draws in the VAE's latent space; a shape the VAE loses, no DiT can show)."""
    have = [i for i, t in enumerate(truths) if t]
    if not have:
        return {}
    originals = [judge(detect(clips[i]), truths[i]) for i in have]
    decoded = [judge(detect(to_uint8(recon[i])), truths[i]) for i in have]
    return {"clips": len(have), "originals": summarize(originals, VOCAB),
            "reconstructions": summarize(decoded, VOCAB)}


def model_metrics(cfg: EvalConfig) -> dict:
    """VAE PSNR + compression on held-out clips; DiT held-out flow loss at fixed t."""
    pkg = load_package(cfg.model, load_text=True)
    vae = pkg.vae.eval()
    vcfg = vae.config
    clips, captions, truths = _heldout_clips(cfg.heldout, cfg.heldout_clips,
                                             vcfg.temporal_down, vcfg.spatial_down)
    x = to_model_range(clips)  # (N, 3, T, H, W)
    out: dict = {"package": cfg.model, "package_hash": pkg.hash, "heldout_clips": len(clips)}
    with torch.no_grad():
        z = vae.encode(x).mean  # (N, C, T', H', W') raw latents
        recon = vae.decode_raw(z).clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)  # per clip, in [0, 1] units
        psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()
        out["vae"] = {"psnr_db": round(float(np.mean(psnr)), 3),
                      "psnr_db_min": round(float(np.min(psnr)), 3),
                      "compression_ratio": round(vae.compression_ratio(*x.shape[2:]), 3),
                      "clip_shape": list(x.shape[1:]), "latent_shape": list(z.shape[1:])}
        out["ceiling"] = detector_ceiling(clips, recon, truths)
        if pkg.dit is not None and pkg.text is not None:
            x0 = vae.normalize(z)
            text, mask = pkg.text(captions)
            t_values = [float(t) for t in cfg.flow_t]
            losses = heldout_flow_loss(pkg.dit.eval(), x0, text, mask, t_values, seed=0)
            # The DiT's output is exactly zero at initialisation, so this IS the untrained
            # model's loss on the same x0 and noise: the reference for "how far it learned".
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            zero = float((eps - x0).pow(2).mean())
            out["flow_loss"] = {f"t={t:g}": round(v, 5) for t, v in losses.items()}
            out["flow_loss_mean"] = round(float(np.mean(list(losses.values()))), 5)
            out["flow_loss_untrained"] = round(zero, 5)
            out["flow_loss_ratio"] = round(out["flow_loss_mean"] / zero, 4)
    return out


def render_speed(cfg: EvalConfig, rows: list[dict]) -> dict:
    secs = [r["seconds"] for r in rows if r.get("seconds")]
    out = {"videos": len(secs), "seconds_per_video_mean": round(float(np.mean(secs)), 4)
           if secs else None}
    uri = storage.join(cfg.renders, SUMMARY_NAME)
    if storage.exists(uri):
        summary = json.loads(storage.read_text(uri))
        out |= {k: summary.get(k) for k in ("videos_per_s", "wall_s", "rendered")}
    return out


def run_eval(cfg: EvalConfig) -> dict:
    if not cfg.renders or not cfg.prompts:
        raise ValueError("eval needs --renders URI and --prompts URI")
    if cfg.heldout and not cfg.model:
        raise ValueError("--heldout needs --model (the package whose VAE and DiT are scored)")
    out = cfg.out or storage.join(cfg.renders, "eval")
    t0 = time.time()
    rows, sheet_videos, truth_rows, detections = score_videos(cfg, out)
    # The headline: held-out prompts (all of them when the file has no split).
    head = [i for i, r in enumerate(rows) if r["split"] == "heldout"] or list(range(len(rows)))
    judged = [rows[i]["verdict"] for i in head]
    groups = [" ".join(str(rows[i]["truth"].get(k, "?")) for k in ("colour", "shape", "motion"))
              for i in head]
    report: dict = {
        "renders": cfg.renders, "prompts": cfg.prompts, "prompts_with_truth": len(truth_rows),
        "videos": sum(r["status"] == "ok" for r in rows),
        "missing": [r["prompt_id"] for r in rows if r["status"] == "missing"],
        "errors": [{"id": r["id"], "error": r["error"]} for r in rows if r["status"] == "error"],
        "attributes": summarize(judged, VOCAB),
        "per_combination": by_group(judged, groups),
        "splits": {name: summarize([r["verdict"] for r in rows if r["split"] == name], VOCAB)
                   for name in ("heldout", "train") if any(r["split"] == name for r in rows)},
        # The same videos against shuffled prompts: what the headline would be by chance.
        "controls": {"shuffled": shuffled_control([detections[i] for i in head],
                                                  [rows[i]["truth"] for i in head], VOCAB)},
        "render": render_speed(cfg, rows),
    }
    if cfg.model and cfg.heldout:
        report["model"] = model_metrics(cfg)
    report["seconds"] = round(time.time() - t0, 2)
    storage.write_text(storage.join(out, "rows.jsonl"),
                       "".join(json.dumps(r, default=str) + "\n" for r in rows))
    # The sheet: a row per prompt (its first video), missing prompts included, file order.
    shown = [v for v in sheet_videos if v is not None][:cfg.sheet_rows]
    missing = [i for i, r in enumerate(rows) if r["status"] == "missing"]
    entries = sorted(shown + [(i, None) for i in missing[:cfg.sheet_rows - len(shown)]],
                     key=lambda e: e[0])
    sheet = eval_sheet([f for _, f in entries], [rows[i]["prompt"] for i, _ in entries],
                       [rows[i]["verdict"] for i, _ in entries])
    storage.write_bytes(storage.join(out, "contact_sheet.png"), to_png(sheet))
    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=1))
    report["out"] = out
    return report


def _pct(section: dict | None, attr: str, key: str = "accuracy") -> str:
    value = (section or {}).get(attr, {}).get(key)
    return "-" if value is None else f"{value:.1%}"


def results_table(report: dict) -> str:
    """Attribute table with its controls, plus the model numbers, as the demo prints them.

    Columns: the held-out prompts' accuracy and Wilson 95 % interval; the training
    combinations' (memorisation, when rendered); the same held-out videos against shuffled
    prompts, and where chance puts that; the detector on the held-out clips' VAE
    reconstructions and on the clips themselves (the ceiling a render can reach)."""
    attrs, splits = report["attributes"], report.get("splits", {})
    shuffled = report.get("controls", {}).get("shuffled", {})
    ceiling = report.get("model", {}).get("ceiling", {})
    head = (f"{'attribute':<10}{'held-out':>9}  {'95% CI':<13}{'train':>7}{'shuffled':>10}"
            f"{'(chance)':>9}{'VAE rec.':>10}{'clips':>7}{'n':>5}")
    lines = [head]
    for attr, s in attrs.items():
        ci = f"[{s['wilson95'][0]:.2f}, {s['wilson95'][1]:.2f}]"
        chance = shuffled.get(attr, {}).get("shuffle_chance")
        lines.append(
            f"{attr:<10}{s['accuracy']:>9.1%}  {ci:<13}"
            f"{_pct(splits.get('train') if len(splits) > 1 else None, attr):>7}"
            f"{_pct(shuffled, attr):>10}{'-' if chance is None else f'{chance:.1%}':>9}"
            f"{_pct(ceiling.get('reconstructions'), attr):>10}"
            f"{_pct(ceiling.get('originals'), attr):>7}{s['n']:>5}")
    m = report.get("model", {})
    if "vae" in m:
        lines.append(f"VAE: PSNR {m['vae']['psnr_db']:.2f} dB on {m['heldout_clips']} held-out "
                     f"clips at {m['vae']['compression_ratio']:.1f}x compression")
    if "flow_loss_mean" in m:
        lines.append(f"DiT: held-out flow loss {m['flow_loss_mean']:.4f} "
                     f"({m['flow_loss_ratio']:.2f}x the untrained model's "
                     f"{m['flow_loss_untrained']:.4f})")
    r = report.get("render", {})
    if r.get("videos_per_s") is not None:
        lines.append(f"render: {r['videos_per_s']:.2f} videos/s")
    return "\n".join(lines)


def run_eval_command(cfg: EvalConfig) -> dict:
    report = run_eval(cfg)
    print(results_table(report), flush=True)
    brief = {k: report[k] for k in ("out", "videos", "seconds")}
    brief["accuracy"] = {a: round(s["accuracy"], 4) for a, s in report["attributes"].items()}
    brief["missing"] = len(report["missing"])
    return brief
