"""Prompt adherence from detections: per-attribute pass/fail, accuracy with Wilson intervals,
confusion matrices, and the shuffled-prompt control. Pure python; the detector
(t2v/eval/detector.py) makes the predictions.

Pairing rule: a prompt names a main object (its `meta` colour/shape/motion). The detected object
it is judged on is the one of the prompt's colour when the video has one, else the largest. So
"colour" asks "is there an object of that colour", and shape/motion ask about THAT object: a red
square next to a blue circle fails "a red circle" on shape, never passes it by accident.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np

from t2v.eval.detector import Detection

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "motion", "count")
NONE = "none"
"""The prediction when no object (or no video) was found."""


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval of a binomial proportion; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def predictions(detection: Detection | None, truth: dict) -> dict[str, str]:
    """The detector's answer to each attribute the ground truth has (strings, NONE if absent)."""
    obj = detection.main(truth.get("colour")) if detection is not None else None
    pred = {}
    for attr in ("colour", "shape", "motion"):
        if attr in truth:
            pred[attr] = getattr(obj, attr) if obj is not None else NONE
    if "count" in truth:
        pred["count"] = str(detection.count) if detection is not None else NONE
    return pred


def judge(detection: Detection | None, truth: dict) -> dict[str, dict[str, object]]:
    """{attr: {"truth", "pred", "pass"}} for each attribute in `truth` (a prompt row's meta)."""
    pred = predictions(detection, truth)
    return {a: {"truth": str(truth[a]), "pred": p, "pass": p == str(truth[a])}
            for a, p in pred.items()}


def summarize(judged: list[dict[str, dict[str, object]]],
              vocab: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Accuracy, Wilson 95 % interval, chance level and confusion matrix per attribute.

    `judged` holds `judge()` results (one per video); `vocab` lists each attribute's possible
    values, for the chance level (1 / number of values) and a full confusion-matrix layout.
    """
    out: dict[str, dict] = {}
    for attr in ATTRIBUTES:
        rows = [j[attr] for j in judged if attr in j]
        if not rows:
            continue
        correct = sum(bool(r["pass"]) for r in rows)
        lo, hi = wilson_interval(correct, len(rows))
        confusion: dict[str, Counter] = defaultdict(Counter)
        for r in rows:
            confusion[str(r["truth"])][str(r["pred"])] += 1
        labels = list((vocab or {}).get(attr, []))
        seen = sorted({str(r["truth"]) for r in rows} | {str(r["pred"]) for r in rows})
        labels += [v for v in seen if v not in labels]
        out[attr] = {
            "accuracy": correct / len(rows),
            "correct": correct,
            "n": len(rows),
            "wilson95": [lo, hi],
            "chance": 1 / len(vocab[attr]) if vocab and vocab.get(attr) else None,
            "labels": labels,
            "confusion": {t: {p: confusion[t][p] for p in labels if confusion[t][p]}
                          for t in labels if t in confusion},
        }
    return out


def shuffle_chance(truths: list[dict], attr: str) -> float | None:
    """The accuracy a prompt-blind model scores on `attr` when its videos are judged against
    shuffled prompts: the chance that two rows drawn at random share the value, sum of p_v^2
    over the values' frequencies (1 / number of values when they are uniform)."""
    values = [str(t[attr]) for t in truths if attr in t]
    if not values:
        return None
    counts = Counter(values)
    return sum((c / len(values)) ** 2 for c in counts.values())


def shuffled_control(detections: list[Detection | None], truths: list[dict],
                     vocab: dict[str, list[str]] | None = None, seed: int = 0,
                     permutations: int = 16) -> dict[str, dict]:
    """The same videos judged against random permutations of their prompts' ground truth
    (every video paired with other rows'): a model or detector that gets the prompt's
    attributes from anything but the pixels drawn for it scores above chance here. Pooled over
    `permutations` draws (one draw of 100 rows wanders +-5 points); per attribute
    `summarize`'s fields over the pooled judgements (n = rows x permutations) plus
    `shuffle_chance`, where an honest score lands."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detections for {len(truths)} truths")
    if not truths:
        return {}
    rng = np.random.default_rng(seed)
    judged = [judge(d, truths[int(j)]) for _ in range(permutations)
              for d, j in zip(detections, rng.permutation(len(truths)), strict=True)]
    out = summarize(judged, vocab)
    for attr, s in out.items():
        s["shuffle_chance"] = shuffle_chance(truths, attr)
        s["permutations"] = permutations
    return out


def by_group(judged: list[dict[str, dict[str, object]]], groups: list[str]) -> dict[str, dict]:
    """Per-group accuracy of each attribute (e.g. per held-out colour-shape-motion combination)."""
    acc: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for g, j in zip(groups, judged, strict=True):
        for attr, r in j.items():
            acc[g][attr].append(bool(r["pass"]))
    return {g: {a: round(sum(v) / len(v), 4) for a, v in attrs.items()} | {"n": len(
        next(iter(attrs.values())))} for g, attrs in sorted(acc.items())}
