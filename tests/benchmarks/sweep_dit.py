"""Where the shape goes, DiT side ([5/7] item 3): train DiT variants on the demo's latents in one
process, render the held-out prompts and score them as `t2v eval` does.

    .venv/bin/python tests/benchmarks/sweep_dit.py --vae PKG [--steps 1800] [--batch 32] \\
        [--variant NAME:key=value,key=value ...] [--out DIR]

PKG is a VAE package: the demo's (OUT/runs/vae/package) or one that tests/benchmarks/sweep_vae.py
wrote (OUT/NAME/package). The clips are the default demo's (the cache sweep_vae.py keeps in
OUT/demo_clips.npz, made if missing), encoded by that VAE (posterior means, normalised), their
captions by the offline MiniLM encoder (its last hidden state; `text_layer=k` takes hidden
state k: 0 the context-free input embeddings). Each variant is the `debug` DiT preset with its overrides
(DiTConfig fields, a/b/c for a tuple such as patch=1/1/1) plus training keys `steps`, `batch`,
`lr`, `shift` (training timestep shift; the render uses the same), `cfg` (render guidance;
`cfg=4/8` scores the one trained model at each), trained by a bare torch loop on the box's cores
the way the DiT stage trains: `t2v.diffusion.flow.flow_loss` (logit-normal t), caption dropout 0.1
to the empty prompt, AdamW with the demo's betas, warm-up 50, cosine LR, clipping at 1, EMA 0.995
(the EMA weights render). The 96 held-out prompts (12 combinations x 8 seeds, the demo's prompt
file) then render with 25 Euler steps and are judged by the eval's detector; so are 48 prompts of
combinations the training data has (12 x 4 seeds, the demo's `train` split: the `train shape` /
`train motion` columns; held-out close to train means the model composes). More keys: `wd` (AdamW
weight decay), `clips=N` (N training clips of the same seed instead of 1024, cached apart),
`seed` (the model's init, noise and batch order), `attr_drop=p` / `colour_drop` / `motion_drop`
(train on the clips' shorter captions: t2v.data.synthetic.alternative_captions),
`shard_order=S` (each pass reads shards of S clips in a new order, each in stored order, as
`t2v train` streams them without a local shuffle buffer). rows.jsonl also
keeps the shapes drawn per held-out combination and the right/asked count per shape. A row measures what the
model and recipe learn in that many steps, not Ray Train's cost (bench_overhead.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sweep_vae import demo_data, fit, parse_variant, per_shape, sweep_parser  # noqa: E402

from t2v.data.synthetic import allowed_combos, clip_spec, heldout_combos  # noqa: E402
from t2v.data.tensors import to_model_range  # noqa: E402
from t2v.data.video import contact_sheet  # noqa: E402
from t2v.demo import heldout_prompt_rows, training_combos  # noqa: E402
from t2v.diffusion.flow import flow_loss, sample_t  # noqa: E402
from t2v.eval.detector import detect  # noqa: E402
from t2v.eval.report import TRUTH_KEYS, VOCAB  # noqa: E402
from t2v.eval.scoring import judge, summarize  # noqa: E402
from t2v.models.dit import VideoDiT, dit_config  # noqa: E402
from t2v.models.package import load_package  # noqa: E402
from t2v.models.text import TextEncoder, TextEncoderConfig  # noqa: E402
from t2v.render.model import RenderModel, render_batch  # noqa: E402
from t2v.render.rows import Sample  # noqa: E402

DEFAULT_VARIANTS = ["demo:"]
TRAIN_KEYS = ("steps", "batch", "lr", "shift", "cfg", "render_steps", "text_layer", "wd",
              "clips", "seed", "attr_drop", "colour_drop", "motion_drop", "shard_order")
# `attr_drop=p` trains on the clips' shorter captions (t2v.data.synthetic's
# alternative_captions: without colour, without motion, the shape alone), each of colour and
# motion left out with probability p; `colour_drop` / `motion_drop` set the two apart.


def partial_captions(count: int, captions: list[str], travel: tuple[float, float],
                     radius: tuple[float, float], frames: int = 9, size: int = 32,
                     ) -> list[list[str]]:
    """Per training clip: [full, no colour, no motion, shape only] captions of its object."""
    allowed = allowed_combos(exclude=[str(c) for c in heldout_combos(12)])
    out = []
    for i in range(count):
        spec = clip_spec(i, seed=0, frames=frames, size=size, allowed=allowed, travel=travel,
                         radius=radius)
        assert spec.caption == captions[i], (spec.caption, captions[i])
        assert len(spec.alternative_captions) == 3, spec.alternative_captions
        out.append([captions[i], *spec.alternative_captions])
    return out


def encode_latents(vae, clips: np.ndarray) -> torch.Tensor:  # noqa: ANN001
    """Normalised latents (N, C, T', H', W')."""
    with torch.no_grad():
        return torch.cat([vae.normalize(vae.encode(to_model_range(clips[i:i + 64])).mean)
                          for i in range(0, len(clips), 64)])


def encode_text(text: TextEncoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text (N, L, D), mask (N, L)."""
    embs, masks = [], []
    with torch.no_grad():
        for i in range(0, len(captions), 64):
            emb, mask = text(captions[i:i + 64])
            embs.append(emb)
            masks.append(mask)
    return torch.cat(embs), torch.cat(masks)


def train_and_score(name: str, model_kw: dict, train_kw: dict, x0: torch.Tensor,
                    text: torch.Tensor, mask: torch.Tensor, empty: tuple, vae, encoder,  # noqa: ANN001
                    rows: list[dict], train_rows: list[dict], clip_shape: tuple[int, int, int],
                    steps: int, batch: int, partial: tuple | None = None,
                    ) -> list[tuple[dict, list[np.ndarray]]]:
    """One (row, held-out videos) per render guidance: `cfg=4/8` scores one trained model at
    guidance 4 and 8 (rows NAME@cfg4, NAME@cfg8). `partial`: (text (N, 4, L, D), mask (N, 4, L))
    of `partial_captions`, for `attr_drop`."""
    steps, batch = int(train_kw.get("steps", steps)), int(train_kw.get("batch", batch))
    lr, shift = float(train_kw.get("lr", 3e-3)), float(train_kw.get("shift", 1.0))
    seed = int(train_kw.get("seed", 0))
    torch.manual_seed(seed)
    cfg = dit_config("debug", **({"in_channels": x0.shape[1], "text_dim": text.shape[-1]}
                                 | model_kw))
    dit = VideoDiT(cfg)
    gen = torch.Generator().manual_seed(seed)
    attr_drop = float(train_kw.get("attr_drop", 0.0))
    colour_drop = float(train_kw.get("colour_drop", attr_drop))
    motion_drop = float(train_kw.get("motion_drop", attr_drop))

    def loss_of(take: np.ndarray) -> torch.Tensor:
        take = torch.from_numpy(take)
        drop = torch.rand(len(take), generator=gen) < 0.1  # caption dropout to ""
        txt, msk = text[take], mask[take]
        if colour_drop or motion_drop:  # 0 full, 1 no colour, 2 no motion, 3 shape only
            which = ((torch.rand(len(take), generator=gen) < colour_drop).long()
                     + 2 * (torch.rand(len(take), generator=gen) < motion_drop).long())
            txt, msk = partial[0][take, which], partial[1][take, which]
        txt = torch.where(drop[:, None, None], empty[0], txt)
        msk = torch.where(drop[:, None], empty[1], msk)
        t = sample_t(len(take), gen, shift=shift)
        return flow_loss(dit, x0[take], txt, msk, t=t, generator=gen)

    seconds, final_loss = fit(name, dit, loss_of, len(x0), steps, batch, lr, warmup=50,
                              ema_decay=0.995, every=200, seed=seed,
                              weight_decay=float(train_kw.get("wd", 0.0)),
                              shard_order=train_kw.get("shard_order"))
    # Rendered as `t2v render` renders (t2v.render.model.render_batch): the prompts' own seeds,
    # the sweep's steps and guidance, Euler, the training shift.
    model = RenderModel(dit.eval(), vae, encoder, torch.device("cpu"))
    frames, height, width = clip_shape

    def score(rows: list[dict], guidance: float) -> tuple[dict, list[np.ndarray], list[dict]]:
        samples = [Sample(id=str(i), prompt=r["prompt"], seed=r["seed"], frames=frames,
                          height=height, width=width, steps=int(train_kw.get("render_steps", 25)),
                          cfg=guidance) for i, r in enumerate(rows)]
        judged, videos = [], []
        for i in range(0, len(samples), 32):
            _, part = render_batch(model, samples[i:i + 32], sampler="euler", shift=shift)
            for r, video in zip(rows[i:i + 32], part, strict=True):
                videos.append(video)
                judged.append(judge(detect(video), {k: r["meta"][k] for k in TRUTH_KEYS}))
        return summarize(judged, VOCAB), videos, judged

    guidances = train_kw.get("cfg", 4.0)
    guidances = guidances if isinstance(guidances, tuple) else (guidances,)
    results = []
    for guidance in guidances:
        acc, videos, judged = score(rows, float(guidance))
        train_acc, _, train_judged = score(train_rows, float(guidance))
        by_combo: dict[str, list[str]] = {}  # held-out combination -> the shapes drawn
        for r, j in zip(rows, judged, strict=True):
            combo = " ".join(r["meta"][k] for k in ("colour", "shape", "motion"))
            by_combo.setdefault(combo, []).append(str(j["shape"]["pred"]))
        label = f"{name}@cfg{guidance:g}" if len(guidances) > 1 else name
        results.append(({
            "name": label, "overrides": model_kw | train_kw | {"cfg": guidance}, "steps": steps,
            "batch": batch, "params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
            "tokens": int(np.prod(dit.grid((1, *x0.shape[1:])))),
            "s_per_step": seconds / steps, "final_loss": final_loss,
            **{a: acc[a]["accuracy"] for a in ("colour", "shape", "motion")},
            **{f"train_{a}": train_acc[a]["accuracy"] for a in ("shape", "motion")},
            "shapes_drawn": by_combo, "shape_by_shape": per_shape(judged),
            "train_shape_by_shape": per_shape(train_judged)}, videos))
    return results


def table(rows: list[dict]) -> str:
    lines = ["| variant | overrides | params | tokens | steps x batch | s/step | loss | colour "
             "| shape | motion | train shape | train motion |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        lines.append(f"| {r['name']} | {over} | {r['params_m']:.2f}M | {r['tokens']} "
                     f"| {r['steps']} x {r['batch']} | {r['s_per_step']:.3f} "
                     f"| {r['final_loss']:.4f} | {r['colour']:.1%} | {r['shape']:.1%} "
                     f"| {r['motion']:.1%} | {r.get('train_shape', float('nan')):.1%} "
                     f"| {r.get('train_motion', float('nan')):.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = sweep_parser(__doc__, "DiT", 1800, 32)
    ap.add_argument("--vae", required=True, help="a VAE package (path or URI)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae = load_package(args.vae, load_text=False, load_dit=False).vae.eval()
    datasets: dict[int, tuple[dict, torch.Tensor]] = {}
    encoders: dict[tuple[int | None, int], tuple] = {}

    def data_for(count: int) -> tuple[dict, torch.Tensor]:
        """(the demo's clips with `count` training clips, their latents)."""
        if count not in datasets:
            demo = demo_data(out / "demo_clips.npz", args.travel, count, args.radius,
                             args.frames, args.size)
            datasets[count] = demo, encode_latents(vae, demo["train"])
        return datasets[count]

    def text_for(layer: int | None, count: int) -> tuple:
        """(encoder, text, mask, empty) with the MiniLM hidden state `layer` (None: last)."""
        if (layer, count) not in encoders:
            encoder = TextEncoder(TextEncoderConfig(layer=layer))
            with torch.no_grad():
                encoders[layer, count] = (encoder, *encode_text(encoder,
                                                                data_for(count)[0]["captions"]),
                                          encoder([""]))
        return encoders[layer, count]

    demo, x0 = data_for(1024)
    encoder, text, mask, _ = text_for(None, 1024)
    held = heldout_combos(12)
    rows = heldout_prompt_rows(held, 8)
    train_rows = heldout_prompt_rows(training_combos(12, held), 4, split="train")
    print(f"latents {tuple(x0.shape)}, text {tuple(text.shape)}; {len(rows)} held-out prompts",
          flush=True)
    results = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, model_kw, train_kw = parse_variant(spec)
        train_kw |= {k: model_kw.pop(k) for k in TRAIN_KEYS if k in model_kw}
        layer, count = train_kw.get("text_layer"), int(train_kw.get("clips", 1024))
        demo, x0 = data_for(count)
        encoder, text, mask, empty = text_for(None if layer is None else int(layer), count)
        partial = None
        if any(float(train_kw.get(k, 0.0)) for k in ("attr_drop", "colour_drop", "motion_drop")):
            rows4 = partial_captions(count, demo["captions"], args.travel, args.radius,
                                     args.frames, args.size)
            flat, flat_mask = encode_text(encoder, [c for four in rows4 for c in four])
            partial = (flat.view(count, 4, *flat.shape[1:]), flat_mask.view(count, 4, -1))
            assert partial[0].shape[2] == text.shape[1], "pad the variants as the captions"
        for result, videos in train_and_score(
                name, model_kw, train_kw, x0, text, mask, empty, vae, encoder, rows, train_rows,
                demo["train"].shape[1:4], args.steps, args.batch, partial):
            results.append(result)
            report(result, videos, rows, out)
    text_md = table(results)
    print(text_md)
    (out / "sweep_dit.md").write_text(text_md + "\n")


def report(result: dict, videos: list[np.ndarray], rows: list[dict], out: Path) -> None:
    """One row to the log and rows.jsonl, its contact sheet (one seed per combination)."""
    name = result["name"]
    print(f"{name}: colour {result['colour']:.1%}, shape {result['shape']:.1%}, motion "
          f"{result['motion']:.1%} (train combinations: shape {result['train_shape']:.1%}, "
          f"motion {result['train_motion']:.1%}), {result['s_per_step']:.3f} s/step", flush=True)
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    sheet = contact_sheet(videos[::8], labels=[r["prompt"] for r in rows[::8]])
    Image.fromarray(sheet).save(out / f"{name}.png")

if __name__ == "__main__":
    main()
