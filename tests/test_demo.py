"""`t2v demo --quick` end to end on the shared local Ray cluster, and the demo's profile rules."""

from __future__ import annotations

import json

import pytest

from t2v.config import DemoConfig
from t2v.configfile import load_config
from t2v.demo import PROFILES, apply_profile, heldout_prompt_rows


def test_profile_values_yield_to_explicit_keys():
    cfg = load_config(DemoConfig, None, ["dit.steps=7", "synth.size=64", "vae.optim.lr=0.1"])
    got = apply_profile(cfg, PROFILES["quick"])
    quick = PROFILES["quick"]()
    assert got.dit.steps == 7 and got.synth.size == 64  # the user's keys win
    assert got.vae.optim.lr == 0.1 and got.vae.optim.schedule == "cosine"  # key by key
    # The profile fills the rest (quick's VAE steps, not the default profile's).
    assert got.vae.steps == quick.vae.steps != PROFILES["default"]().vae.steps
    assert (got.vae.stage, got.vae.name, got.dit.stage) == ("vae", "vae", "dit")
    assert got.render.steps == quick.render.steps and got.synth.num == 256
    # Profiles are plain configs: each one validates, and long trains at 17x64x64.
    long = PROFILES["long"]()
    assert (long.synth.frames, long.synth.size, long.vae.data.frames) == (17, 64, 17)
    # Applying a profile leaves the profile alone: a fresh call still gives the same config.
    assert got.dit.steps != PROFILES["default"]().dit.steps
    assert apply_profile(DemoConfig(), PROFILES["default"]) == PROFILES["default"]()
    # A model override is merged key by key: the profile's others stay.
    mine = load_config(DemoConfig, None, ["dit.model_overrides.dim=192",
                                          "vae.model_overrides.latent_channels=8"])
    got = apply_profile(mine, PROFILES["long"])
    assert got.dit.model_overrides == {"patch": [1, 4, 4], "dim": 192}
    assert got.vae.model_overrides == {"latent_channels": 8, "shortcut": True}


@pytest.mark.parametrize("name", ["default", "quick", "long"])
def test_profile_dit_patches_tile_the_latents_as_the_default_does(name):
    from t2v.models.dit import dit_config
    from t2v.models.vae import vae_config

    def grid(cfg: DemoConfig) -> tuple[int, int]:  # DiT tokens along a latent frame's side
        side = cfg.synth.size // vae_config(cfg.vae.model, **cfg.vae.model_overrides).spatial_down
        patch = dit_config(cfg.dit.model, **cfg.dit.model_overrides).patch
        assert side % patch[1] == 0 and side % patch[2] == 0, (name, side, patch)
        return side // patch[1], side // patch[2]

    # --long's 64x64 frames in 1x4x4 patches give the default's 4x4 tokens a latent frame, each
    # the same share of the frame (BENCHMARKS.md, the 12th and 13th --long runs)
    assert grid(PROFILES[name]()) == grid(PROFILES["default"]()) == (4, 4)


def test_heldout_prompt_rows_carry_ground_truth():
    from t2v.data.synthetic import Combo

    rows = heldout_prompt_rows([Combo("red", "circle", "left"), Combo("cyan", "square",
                                                                       "still")], 3)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert rows[0]["meta"] == {"colour": "red", "shape": "circle", "motion": "left", "count": 1}
    assert all(r["meta"]["colour"] in r["prompt"] and r["meta"]["shape"] in r["prompt"]
               for r in rows)


def test_training_combos_are_seen_in_training_and_fixed():
    from t2v.data.synthetic import heldout_combos
    from t2v.demo import training_combos

    held = heldout_combos(12)
    chosen = training_combos(6, held)
    assert len(chosen) == 6 and not {str(c) for c in chosen} & {str(c) for c in held}
    assert chosen == training_combos(6, held)
    # Matched to the held-out set: each one's shape and motion are a held-out combination's,
    # and all 12 follow held's shape mix (a plain draw had given 4 circles, 2 squares).
    assert all(any((c.shape, c.motion) == (h.shape, h.motion) for h in held) for c in chosen)
    every = training_combos(12, held)
    assert sorted(c.shape for c in every) == sorted(h.shape for h in held)
    assert len({str(c) for c in training_combos(78, held)}) == 78  # all the training has
    rows = heldout_prompt_rows(chosen, 2, split="train")
    assert all(r["meta"]["split"] == "train" and r["id"].startswith("train-") for r in rows)


@pytest.mark.slow
def test_quick_demo_end_to_end(ray_local, tmp_path, capsys):
    from t2v.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "colour" in printed and "contact sheet" in printed
    report = json.loads((out / "eval" / "report.json").read_text())
    drawn = report["attributes"]["shape"]["confusion"]  # what was drawn for each shape asked
    line = next(x for x in printed.splitlines() if x.startswith("- shape drawn, by the shape"))
    for asked, d in drawn.items():
        assert f"{asked} {d.get(asked, 0)}/{sum(d.values())}" in line, (line, drawn)
    assert (out / "eval" / "contact_sheet.png").stat().st_size > 10_000
    assert len(list((out / "eval" / "gifs").glob("*.gif"))) == report["videos"] > 0
    assert not report["missing"] and not report["errors"]
    model = report["model"]
    # The held-out flow loss fell well below the untrained model's (the DiT starts at zero).
    assert model["flow_loss_mean"] < 0.8 * model["flow_loss_untrained"]
    assert model["vae"]["compression_ratio"] >= 24
    colour = report["attributes"]["colour"]
    assert colour["wilson95"][0] > colour["chance"], colour["confusion"]
    shuffled = report["controls"]["shuffled"]["colour"]  # the same videos, shuffled prompts
    assert shuffled["accuracy"] < colour["accuracy"], (shuffled, colour)
    assert set(report["splits"]) == {"heldout", "train"}  # training combinations apart
    assert report["splits"]["train"]["colour"]["n"] == 12
    ceiling = model["ceiling"]  # the detector on the held-out clips and their reconstructions
    assert ceiling["originals"]["colour"]["accuracy"] == 1.0
    assert ceiling["clips"] == PROFILES["quick"]().heldout_clips
    # The VAE stage (Ray Train on raw shards, 2 workers, ZeRO-2) trained on windows
    # (data.crop: throughput counts their pixels) and made a VAE-only package with fitted
    # latent statistics, one per latent channel, validated by PSNR on whole held-out clips.
    vae = json.loads((out / "runs" / "vae" / "package" / "model.json").read_text())
    assert vae["dit"] is None and vae["run"]["stage"] == "vae"
    quick = PROFILES["quick"]()
    channels = quick.vae.model_overrides["latent_channels"]
    assert len(vae["vae"]["shift"]) == len(vae["vae"]["scale"]) == channels
    assert all(v != 0.0 for v in vae["vae"]["shift"]) and all(v != 1.0 for v in vae["vae"]["scale"])
    vae_rows = [json.loads(line) for line in
                (out / "runs" / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert any("psnr" in r.get("val", {}) for r in vae_rows)
    frames, side = quick.vae.data.crop
    speed = [r for r in vae_rows if "tokens_per_s" in r]
    assert speed and all(r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(
        frames * side * side) for r in speed)
    # ... and its package codes whole clips (the encode stage read 9x32x32 into 3x8x8 latents).
    index = json.loads((out / "latents" / "_index.json").read_text())
    assert index["latent_shapes"] == [[channels, 3, 8, 8]], index
    # The package knows its training geometry, and render (given no size flags) used it.
    render = json.loads((out / "runs" / "dit" / "package" / "model.json").read_text())["render"]
    assert (render["frames"], render["height"], render["width"], render["fps"]) == (
        quick.synth.frames, quick.synth.size, quick.synth.size, quick.synth.fps)
    rows = [json.loads(line) for part in (out / "renders" / "manifest").glob("*.jsonl")
            for line in part.read_text().splitlines()]
    assert rows and all((r["frames"], r["height"], r["width"], r["fps"]) == (
        render["frames"], render["height"], render["width"], render["fps"]) for r in rows)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["seconds"]) >= {"synth", "vae", "encode", "dit", "render", "eval"}
    # Rerunning resumes: nothing is trained or rendered again.
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "already finished" in again and "0 rendered" in again
