"""`t2v demo --quick` end to end on the shared local Ray cluster, and the demo's profile rules."""

from __future__ import annotations

import json

import pytest

from t2v.config import DemoConfig, load_config
from t2v.demo import PROFILES, apply_profile, heldout_prompt_rows


def test_profile_values_yield_to_explicit_keys():
    cfg = load_config(DemoConfig, None, ["dit.steps=7", "synth.size=64"])
    got = apply_profile(cfg, PROFILES["quick"])
    assert got.dit.steps == 7 and got.synth.size == 64  # the user's keys win
    assert got.vae.steps == PROFILES["quick"]["vae.steps"]  # the profile fills the rest
    assert got.render.steps == PROFILES["quick"]["render.steps"]


def test_heldout_prompt_rows_carry_ground_truth():
    from t2v.data.synthetic import Combo

    rows = heldout_prompt_rows([Combo("red", "circle", "left"), Combo("cyan", "square",
                                                                       "still")], 3)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert rows[0]["meta"] == {"colour": "red", "shape": "circle", "motion": "left", "count": 1}
    assert all(r["meta"]["colour"] in r["prompt"] and r["meta"]["shape"] in r["prompt"]
               for r in rows)


@pytest.mark.slow
def test_quick_demo_end_to_end(ray_local, tmp_path, capsys):
    from t2v.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "colour" in printed and "contact sheet" in printed
    report = json.loads((out / "eval" / "report.json").read_text())
    assert (out / "eval" / "contact_sheet.png").stat().st_size > 10_000
    assert len(list((out / "eval" / "gifs").glob("*.gif"))) == report["videos"] > 0
    assert not report["missing"] and not report["errors"]
    model = report["model"]
    # The held-out flow loss fell well below the untrained model's (the DiT starts at zero).
    assert model["flow_loss_mean"] < 0.8 * model["flow_loss_untrained"]
    assert model["vae"]["compression_ratio"] >= 24
    colour = report["attributes"]["colour"]
    assert colour["accuracy"] > colour["chance"], colour["confusion"]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["seconds"]) >= {"synth", "vae", "encode", "dit", "render", "eval"}
    # Rerunning resumes: nothing is trained or rendered again.
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "already finished" in again and "0 rendered" in again
