"""Eval: detector validity on generator clips, scoring numerics, and a report from a render dir."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from t2v.data import synthetic as S
from t2v.data.video import decode_video, encode_mp4
from t2v.eval.detector import detect
from t2v.eval.scoring import judge, summarize, wilson_interval
from t2v.render.rows import RenderJob, Sample

ATTRS = ("colour", "shape", "motion")

JOB = RenderJob(model="pkg", package_hash="0" * 64, sampler="euler", shift=1.0, fps=8.0, crf=18,
                run="r1", source="prompts.jsonl")


def _clips(n: int, *, seed: int, frames: int, size: int, two: float = 0.0, mp4: bool = True):
    """Generator clips (through H.264, as rendered videos are) with their ground truth."""
    allowed = S.all_combos()
    for i in range(n):
        spec = S.clip_spec(i, seed=seed, frames=frames, size=size, allowed=allowed,
                           two_object_prob=two)
        video = S.render_clip(spec)
        if mp4:
            video = decode_video(encode_mp4(video, fps=8.0, crf=18))
        yield video, spec.meta()


def _truth(meta: dict) -> dict:
    return {k: meta[k] for k in (*ATTRS, "count")}


@pytest.mark.parametrize("frames,size,n", [(9, 32, 150), (17, 64, 45)])
def test_detector_predicts_generator_clips(frames, size, n):
    """>= 99 % per attribute on ground-truth clips: every combination, both clip sizes."""
    judged = [judge(detect(v), _truth(m)) for v, m in _clips(n, seed=11, frames=frames,
                                                             size=size)]
    summary = summarize(judged)
    for attr in (*ATTRS, "count"):
        assert summary[attr]["accuracy"] >= 0.99, (attr, summary[attr]["confusion"])
    # Every colour, shape and motion was exercised.
    for attr in ATTRS:
        assert set(summary[attr]["confusion"]) == set(
            {"colour": S.COLOURS, "shape": S.SHAPES, "motion": S.MOTIONS}[attr])


def test_detector_counts_two_objects_and_pairs_the_prompted_one():
    judged, twos = [], 0
    for video, meta in _clips(60, seed=5, frames=9, size=32, two=1.0):
        twos += meta["count"] == 2
        judged.append(judge(detect(video), _truth(meta)))
    assert twos >= 20
    summary = summarize(judged)
    for attr in (*ATTRS, "count"):
        assert summary[attr]["accuracy"] >= 0.97, (attr, summary[attr]["confusion"])


def test_mismatched_prompts_fail_exactly_that_attribute():
    """A clip of X judged against a prompt that differs from X in ONE attribute fails it."""
    other = {"colour": list(S.COLOURS), "shape": list(S.SHAPES), "motion": list(S.MOTIONS)}
    fails: Counter = Counter()
    total = 0
    for video, meta in _clips(30, seed=3, frames=9, size=32, mp4=False):
        det = detect(video)
        for attr in ATTRS:
            wrong = next(v for v in other[attr] if v != meta[attr])
            verdict = judge(det, _truth(meta) | {attr: wrong})
            total += 1
            fails[attr] += not verdict[attr]["pass"]
            assert all(verdict[a]["pass"] for a in ATTRS if a != attr)
    assert sum(fails.values()) == total, fails


def test_background_only_video_is_all_fail():
    video = np.full((9, 32, 32, 3), 30, np.uint8)
    det = detect(video)
    assert det.count == 0
    verdict = judge(det, {"colour": "red", "shape": "circle", "motion": "left", "count": 1})
    assert not any(v["pass"] for v in verdict.values())
    assert verdict["colour"]["pred"] == "none"


def test_wilson_interval_reference_values():
    # Reference: Wilson (1927) score interval, z = 1.959964; e.g. Newcombe (1998) table I.
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(81, 81)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # Formula check against a direct evaluation for a few (k, n).
    z = 1.959964
    for k, n in [(3, 7), (50, 96), (95, 96)]:
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert wilson_interval(k, n) == pytest.approx((c - h, c + h))


def test_summary_confusion_and_chance():
    judged = [judge(None, {"colour": "red"}), {"colour": {"truth": "red", "pred": "red",
                                                          "pass": True}}]
    s = summarize(judged, {"colour": list(S.COLOURS)})["colour"]
    assert (s["correct"], s["n"], s["accuracy"]) == (1, 2, 0.5)
    assert s["chance"] == pytest.approx(1 / 6)
    assert s["confusion"] == {"red": {"red": 1, "none": 1}}


def test_eval_report_from_a_render_dir(tmp_path):
    """Videos + manifest + prompt file -> report.json, rows, contact sheet, GIFs; a corrupt
    video and a prompt with no video are failures that are counted, not crashes."""
    from t2v.config import EvalConfig
    from t2v.eval.report import run_eval
    from t2v.render import manifest as mf

    renders, prompts = tmp_path / "renders", tmp_path / "prompts.jsonl"
    rows, lines = [], []
    for i, (video, meta) in enumerate(_clips(6, seed=2, frames=9, size=32, mp4=False)):
        pid = f"p{i}"
        truth = _truth(meta)
        if i == 1:  # the prompt asks for another colour than the clip shows
            truth["colour"] = next(c for c in S.COLOURS if c != meta["colour"])
        if i == 0:  # a training combination: scored apart, not in the headline
            truth["split"] = "train"
        lines.append(json.dumps({"id": pid, "prompt": meta["caption"] if "caption" in meta
                                 else "a clip", "meta": truth}))
        if i == 5:
            continue  # never rendered
        uri = mf.video_uri(str(renders), pid)
        data = encode_mp4(video, fps=8.0) if i != 4 else b"not a video"
        (renders / "videos").mkdir(parents=True, exist_ok=True)
        (renders / "videos" / f"{pid}.mp4").write_bytes(data)
        sample = Sample(id=pid, prompt_id=pid, prompt="p", seed=i, steps=2, cfg=4.0, frames=9,
                        height=32, width=32, meta=truth)
        rows.append(mf.make_row(JOB, sample, status="ok", video=uri, seconds=0.5))
    prompts.write_text("\n".join(lines) + "\n")
    mf.write_part(str(renders), "r1", "b0", rows)
    cfg = EvalConfig(renders=str(renders), prompts=str(prompts))
    report = run_eval(cfg)
    out = renders / "eval"
    assert report["videos"] == 4 and report["missing"] == ["p5"]
    assert [e["id"] for e in report["errors"]] == ["p4"]
    colour = report["attributes"]["colour"]  # held-out rows only: p1..p5
    assert (colour["n"], colour["correct"]) == (5, 2)  # p1 wrong colour, p4 corrupt, p5 missing
    assert report["attributes"]["shape"]["correct"] == 3
    train = report["splits"]["train"]["colour"]
    assert (train["n"], train["correct"]) == (1, 1)
    assert report["splits"]["heldout"]["colour"] == colour
    shuffled = report["controls"]["shuffled"]["colour"]
    assert shuffled["n"] == 5 * 16 and shuffled["shuffle_chance"] is not None
    assert json.loads((out / "report.json").read_text())["attributes"]["colour"]["n"] == 5
    assert len((out / "rows.jsonl").read_text().splitlines()) == 6
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "gifs").iterdir()) == [f"p{i}.gif" for i in range(4)]
    assert report["render"]["seconds_per_video_mean"] == pytest.approx(0.5)


def test_shuffled_prompts_fall_to_chance_and_chance_is_the_sum_of_squares():
    from t2v.eval.report import VOCAB
    from t2v.eval.scoring import shuffle_chance, shuffled_control

    assert shuffle_chance([{"colour": "red"}] * 3 + [{"colour": "blue"}], "colour") == 0.625
    assert shuffle_chance([{"shape": "circle"}], "colour") is None
    clips = list(_clips(120, seed=9, frames=9, size=32, mp4=False))
    detections = [detect(v) for v, _ in clips]
    truths = [_truth(m) for _, m in clips]
    real = summarize([judge(d, t) for d, t in zip(detections, truths, strict=True)], VOCAB)
    control = shuffled_control(detections, truths, VOCAB, seed=1)
    for attr in ("colour", "shape", "motion"):  # 16 x 120 pooled: about +-1.1 points
        assert abs(control[attr]["accuracy"] - control[attr]["shuffle_chance"]) < 0.05, (
            attr, control[attr])
        assert control[attr]["accuracy"] < real[attr]["accuracy"] - 0.5, attr
    assert control == shuffled_control(detections, truths, VOCAB, seed=1)  # seeded


def test_detector_ceiling_reads_the_clips_and_their_reconstructions():
    import torch

    from t2v.data.tensors import to_model_range
    from t2v.eval.report import detector_ceiling

    clips = list(_clips(12, seed=4, frames=9, size=32, mp4=False))
    video = np.stack([v for v, _ in clips])
    truths = [_truth(m) for _, m in clips] + [{}]  # a clip without ground truth is left out
    video = np.concatenate([video, video[:1]])
    exact = detector_ceiling(video, to_model_range(video), truths)
    assert exact["clips"] == 12
    assert exact["reconstructions"] == exact["originals"]
    assert exact["originals"]["colour"]["accuracy"] == 1.0
    blank = detector_ceiling(video, torch.full((13, 3, 9, 32, 32), -1.0), truths)
    assert blank["reconstructions"]["colour"]["accuracy"] == 0.0  # a VAE that draws nothing
    assert blank["originals"] == exact["originals"]
