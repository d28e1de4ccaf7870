"""Hostile prompt files: 1,000 generated lines mixing valid rows with random bytes, huge lines,
deep JSON, wrong types, duplicate ids and Unicode edge cases. Zero crashes; every bad line is an
error row naming its line, every good line a row (dry run for all of them, a real render to S3
for the strangest good ones, whose prompts must come back from the manifest unchanged)."""

from __future__ import annotations

import json
import os
import random

from t2v import storage
from t2v.render import manifest as mf
from t2v.render.pipeline import plan_render, run_render_command
from tests.test_render import config

SEED = int(os.environ.get("T2V_CHAOS_SEED") or 20261202)
LINES = 1000
ODD_TEXT = ["line\u2028separator", "para\u2029graph", "next\u0085line", "rtl \u202e txet",
            "emoji \U0001f3a5\U0001f30a", "zero\u200bwidth", "combining e\u0301\u0301",
            "tab\tinside", "bom \ufeff inside", "CJK 動画 生成", "quote \" and \\ backslash",
            "<script>alert(1)</script>", "null \\u0000 spelled out", "\U000e0001 tag"]


def good_line(rng: random.Random, i: int, ids: set[str]) -> str:
    row: dict = {"prompt": f"{rng.choice(ODD_TEXT)} #{i}"}
    if rng.random() < 0.3:
        row["id"] = f"row-{i}"
        ids.add(row["id"])
    if rng.random() < 0.3:
        row["seed"] = rng.randrange(0, 2**62)
    if rng.random() < 0.2:
        row["cfg"] = round(rng.uniform(0, 10), 3)
    if rng.random() < 0.2:
        row["frames"] = rng.choice([1, 5, 9])
    if rng.random() < 0.2:
        row["meta"] = {"k": [{"deep": list(range(3))}] * 2, "s": rng.choice(ODD_TEXT)}
    if rng.random() < 0.1:
        row["negative_prompt"] = None  # null: not given
    return json.dumps(row, ensure_ascii=rng.random() < 0.5)


def bad_line(rng: random.Random, i: int, ids: set[str]) -> tuple[bytes, str]:
    """(the line, a part of the reason it must be refused with)."""
    kind = rng.randrange(24)
    if kind == 0:
        raw = bytes(rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randint(1, 300)))
        return b"\xff" + raw, "invalid UTF-8"
    if kind == 1:
        return ("[" * rng.randint(33, 20000)).encode(), "nested deeper"
    if kind == 2:
        return ('{"prompt": "x", "meta": ' + "{\"a\": " * 5000 + "1" + "}" * 5001).encode(), \
            "nested deeper"
    if kind == 3:
        return f'{{"prompt": "x", "seed": {"9" * rng.randint(20, 6000)}}}'.encode(), "digits"
    if kind == 4:
        return rng.choice([b'{"prompt": "x", "cfg": NaN}', b'{"prompt": "x", "cfg": Infinity}',
                           b'{"prompt": "x", "cfg": -Infinity}']), "JSON allows"
    if kind == 5:
        return b'{"prompt": "bad \\udc80 half"}', "lone surrogate"
    if kind == 6:
        return b'{"prompt": "x", "seed": "12"}', "seed: expected an integer"
    if kind == 7:
        return b'{"prompt": "x", "steps": 2.5}', "steps: expected an integer"
    if kind == 8:
        return b'{"prompt": 5}', "prompt: expected a string"
    if kind == 9:
        return b'{"prompt": "x", "meta": [1]}', "meta: expected a JSON object"
    if kind == 10:
        return b'{"prompt": "x", "colour": "red"}', "unknown field"
    if kind == 11:
        return b'{"seed": 1}', "missing prompt"
    if kind == 12:
        return b'{"prompt": "   "}', "empty prompt"
    if kind == 13:
        return json.dumps({"prompt": "x", "id": "../../etc/passwd"}).encode(), "must match"
    if kind == 14:
        return json.dumps({"prompt": "x", "id": ".hidden"}).encode(), "must not start"
    if kind == 15 and ids:
        return json.dumps({"prompt": f"dup {i}", "id": sorted(ids)[0]}).encode(), "repeated id"
    if kind == 16:
        return b'{"prompt": "x", "steps": 0}', "out of range"
    if kind == 17:
        return b'{"prompt": "x", "cfg": 1e400}', "out of range"
    if kind == 18:
        return b'{"prompt": "x", "frames": 8}', "must be 1 + 4k"
    if kind == 19:
        return b'{"prompt": "x", "height": 33}', "height"
    if kind == 20:
        return b'{"prompt": "nul \\u0000 inside"}', "NUL"
    if kind == 21:
        return rng.choice([b"[1, 2]", b'"just a string"', b"42", b"null"]), "expected a JSON object"
    if kind == 22:
        return b'{"prompt": "x"} trailing', "invalid JSON"
    return json.dumps({"prompt": "long " * 40_000}).encode(), "tokens"  # ~200 KB, >16 tokens


def hostile_file(rng: random.Random) -> tuple[bytes, dict[int, str], set[int]]:
    """(file, line -> expected reason for bad lines, good line numbers)."""
    ids: set[str] = set()
    lines, bad, good = [], {}, set()
    for n in range(1, LINES + 1):
        if rng.random() < 0.5:
            line, reason = bad_line(rng, n, ids)
            bad[n] = reason
        else:
            line = good_line(rng, n, ids).encode()
            good.add(n)
        assert b"\n" not in line
        lines.append(line)
    return b"\n".join(lines) + b"\n", bad, good


def test_a_thousand_hostile_lines_name_every_bad_line_and_keep_every_good_one(
        render_package, tmp_path, ledger):
    rng = random.Random(SEED)
    data, bad, good = hostile_file(rng)
    prompts = tmp_path / "hostile.jsonl"
    prompts.write_bytes(data)
    out = str(tmp_path / "out")
    report = run_render_command(config(render_package, str(prompts), out, truncate=False,
                                       dry_run=True))
    assert report["lines"] == LINES, SEED
    errors = {e["line"]: e["error"] for e in report["errors"]}
    assert errors.keys() == bad.keys(), (SEED, sorted(errors.keys() ^ bad.keys())[:10])
    for line, reason in bad.items():
        assert reason in errors[line], (SEED, line, reason, errors[line][:200])
        assert "\n" not in errors[line] and len(errors[line]) < 400, (SEED, line)
    assert report["valid_rows"] == len(good) and report["to_render"] == len(good)
    assert not os.path.exists(out)  # a dry run writes nothing
    ledger(fault="1,000 generated prompt lines (dry run)", injected=len(bad), survived=len(bad),
           lost=0, note=f"seed {SEED}: {len(bad)} bad lines named, {len(good)} good kept")


def test_the_strangest_good_lines_render_and_round_trip_through_the_manifest(
        ray_local, render_package, s3_bucket, ledger):
    """One good row per odd text, rendered to S3: each manifest row's prompt and meta are the
    line's exactly, and a rerun finds them done (none lost to a line splitter)."""
    rows = [{"prompt": t, "id": f"odd-{i}", "meta": {"text": t}} for i, t in enumerate(ODD_TEXT)]
    prompts = f"{s3_bucket}/odd.jsonl"
    storage.write_bytes(prompts, "\n".join(json.dumps(r, ensure_ascii=False)
                                           for r in rows).encode() + b"\n")
    out = f"{s3_bucket}/out"
    cfg = config(render_package, prompts, out, batch_size=len(rows))
    summary = run_render_command(cfg)
    assert (summary["rendered"], summary["failed"]) == (len(rows), 0)
    ok, errors = mf.latest_rows(mf.read_manifest(out))
    assert not errors and sorted(ok) == sorted(r["id"] for r in rows)
    for r in rows:
        assert ok[r["id"]]["prompt"] == r["prompt"] and ok[r["id"]]["meta"] == r["meta"]
    plan = plan_render(cfg)
    assert (len(plan.todo), plan.done) == (0, len(rows))
    ledger(fault="Unicode edge cases in rendered prompts (U+2028, U+0085, RTL, ...)",
           injected=len(rows), survived=len(rows), lost=0)
