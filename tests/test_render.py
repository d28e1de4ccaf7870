"""`t2v render`: prompt files -> videos, posters and a manifest, on Ray Data actors.

A tiny package built here (debug VAE and DiT, randomised so seeds matter), 9x32x32 clips and 2
sampler steps keep every job to seconds on a 2-core CPU.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2v import storage
from t2v.config import RenderConfig
from t2v.data.video import decode_video, encode_mp4
from t2v.models.package import PackageError
from t2v.render import manifest as mf
from t2v.render.model import RenderModel, render_batch
from t2v.render.pipeline import make_batches, plan_render, run_render_command
from t2v.render.prompts import PromptRules, RowError, derive_id, derive_seed, parse_prompts
from t2v.render.rows import SAMPLES, RenderJob, Sample

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 16  # the render_package fixture's text length
LONG = "a very long prompt " * 12  # > 16 MiniLM tokens


@pytest.fixture(scope="module")
def package(render_package) -> str:
    return render_package


def config(package: str, prompts: str, out: str, **kw) -> RenderConfig:
    return RenderConfig(**{"model": package, "prompts": prompts, "out": out, "steps": 2,
                           "cfg": 3.0, "frames": 9, "height": 32, "width": 32,
                           "batch_size": 2, **kw})


def ok_rows(out: str) -> list[dict]:
    return [r for r in mf.read_manifest(out) if r["status"] == "ok"]


def check_video(row: dict) -> None:
    frames = decode_video(storage.read_bytes(row["video"]))
    assert frames.shape == (row["frames"], row["height"], row["width"], 3), row["id"]
    poster = Image.open(io.BytesIO(storage.read_bytes(row["poster"])))
    assert poster.format == "PNG" and poster.size == (row["width"], row["height"])


# ----------------------------------------------------------------------------- pure parts


def test_prompt_parsing_rules():
    rules = PromptRules(base_seed=7, steps=3, frames=9, height=32, width=32)
    data = "\ufeff# a comment\r\n\r\nred circle\r\n  blue square  \n#x\n".encode()
    parsed = parse_prompts(data, ".txt", rules, "p.txt")
    assert [(r.line, r.prompt) for r in parsed.rows] == [(3, "red circle"), (4, "blue square")]
    row = parsed.rows[0]
    assert row.id == derive_id({"prompt": "red circle"}) and len(row.id) == 16
    assert row.seed == derive_seed(7, row.id) and row.steps == 3 and row.cfg == 5.0
    # The same fields give the same id in every format (CSV cells are typed first).
    j = parse_prompts(b'{"prompt": "x", "seed": 3}', ".jsonl", rules).rows[0]
    c = parse_prompts(b"seed,prompt\n3,x\n", ".csv", rules).rows[0]
    assert j.id == c.id and j.seed == c.seed == 3 and c.line == 2
    # num_per_prompt: ids {id}-{k}, seeds seed + k; a later row may not take them.
    two = PromptRules(num_per_prompt=2)
    p2 = parse_prompts(b'{"prompt": "a", "id": "a", "seed": 5}\n{"prompt": "b", "id": "a-1"}',
                       ".jsonl", two)
    assert [(s.id, s.seed) for s in p2.rows[0].samples(2)] == [("a-0", 5), ("a-1", 6)]
    assert {s.prompt_id for s in p2.rows[0].samples(2)} == {"a"}
    assert p2.errors[0].error == "repeated id 'a-1' (first on line 1)"
    for header, msg in [(b"prompt,colour\n", "unknown columns 'colour'"),
                        (b"id,seed\n", "no 'prompt' column"), (b"prompt,prompt\n", "repeats")]:
        with pytest.raises(ValueError, match=msg):
            parse_prompts(header + b"x,y\n", ".csv", rules, "p.csv")


def test_hostile_lines_become_error_rows_with_their_line():
    """Lines that used to stop a whole file (RecursionError, OverflowError, ValueError without a
    line) or could never be written to the manifest (a lone surrogate) are error rows naming
    their line; prompts with Unicode line separators are valid and survive the manifest."""
    rules = PromptRules(frames=9, height=32, width=32)
    separators = "a\u2028b\u2029c\u0085d\u000be"
    lines = [
        '{"prompt": "ok"}',
        '{"prompt": "\\ud800 alone"}',  # a lone surrogate escape
        '{"prompt": "x", "meta": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"prompt": "x", "cfg": 1' + "0" * 400 + "}",
        '{"prompt": "x", "seed": ' + "7" * 5000 + "}",
        '{"prompt": "x", "cfg": NaN}',
        '{"prompt": "x", "meta": {"k": "[{\\"not nesting\\"}]"}}',
        json.dumps({"prompt": separators}, ensure_ascii=False),
        '{"prompt": "x", "meta": {"key\\udfff": 1}}',
    ]
    parsed = parse_prompts("\n".join(lines).encode(), ".jsonl", rules, "p.jsonl")
    assert [r.line for r in parsed.rows] == [1, 7, 8]
    assert parsed.rows[2].prompt == separators
    errors = {e.line: e.error for e in parsed.errors}
    assert errors == {
        2: "lone surrogate \\ud800 in a string (not Unicode text)",
        3: "JSON nested deeper than 32 levels",
        4: "integer of 401 digits is out of range",
        5: "integer of 5000 digits is out of range",
        6: "NaN is not a number JSON allows",
        9: "lone surrogate \\udfff in a string (not Unicode text)",
    }
    job = RenderJob(model="m", package_hash="h", sampler="euler", shift=1.0, fps=8.0, crf=18,
                    run="r1", source="p.jsonl")
    good = Sample(id="s", prompt=separators, seed=1, steps=2, cfg=3.0, frames=9, height=32,
                  width=32, line=8)
    rows = [mf.make_row(job, good, status="ok")] + [mf.prompt_error_row(job, e)
                                                     for e in parsed.errors]
    back = mf.parse_part(mf.to_jsonl(rows))  # every row writable, and read back whole
    assert [r["line"] for r in back] == [8, 2, 3, 4, 5, 6, 9]
    assert back[0]["prompt"] == separators and back[1]["prompt"] is None


def test_batches_group_by_shape_steps_and_guidance():
    s = [Sample(id=str(i), prompt="p", seed=i, frames=f, height=32, width=32, steps=st, cfg=c)
         for i, (f, st, c) in enumerate([(9, 2, 3.0), (5, 2, 3.0), (9, 2, 4.0), (9, 3, 3.0),
                                          (9, 2, 1.0), (9, 2, 3.0), (9, 2, 3.0)])]
    batches = [[x.id for x in b] for b in make_batches(s, 2)]
    # The wire format to renderer actors round-trips the typed samples exactly.
    assert SAMPLES.validate_json(SAMPLES.dump_json(s)) == s
    assert batches == [["0", "2"], ["5", "6"], ["1"], ["3"], ["4"]]


def test_manifest_dedupe_and_escaped_gallery():
    job = RenderJob(model="m", package_hash="h", sampler="euler", shift=1.0, fps=8.0, crf=18,
                    run="r1", source="p.jsonl")
    job2 = job.model_copy(update={"run": "r2"})
    a = Sample(id="a", prompt="x", seed=1, steps=2, cfg=3.0, frames=9, height=32, width=32,
               line=1)
    rows = [mf.make_row(job, a, status="ok"),
            mf.prompt_error_row(job, RowError(2, "old")),
            mf.make_row(job2, a.model_copy(update={"prompt": "<b>&"}), status="ok"),
            mf.prompt_error_row(job2, RowError(3, "e"))]
    assert list(rows[0].model_dump()) == list(mf.ROW_FIELDS)
    rows = mf.parse_part(mf.to_jsonl(rows))  # what readers get back from a part file
    assert rows[0]["seed"] == 1 and rows[1]["seed"] is None and rows[3]["error"] == "e"
    ok, errors = mf.latest_rows(rows)
    assert ok["a"]["run"] == "r2" and [e["line"] for e in errors] == [3]
    page = mf.gallery_html(ok, errors)
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert 'href="videos/a.mp4"' in page and 'src="posters/a.png"' in page
    assert mf.new_run_id(1.5) < mf.new_run_id(2.25) < mf.new_run_id(1e10)


def test_same_seed_same_video_at_batch_size_1_and_4(package):
    """Batch mates change only matmul summation order. Tolerance: latents 1e-5 absolute,
    pixels 2 uint8 levels (one seen), decoded mp4s 1.0 mean absolute level."""
    model, _ = RenderModel.load(package)
    samples = [Sample(id=f"s{i}", prompt=p, negative_prompt=n, seed=100 + i, cfg=c, steps=2,
                      frames=9, height=32, width=32)
               for i, (p, n, c) in enumerate([("red circle", "", 3.0), ("blue square", "", 5.0),
                                              ("green star", "blur", 3.0), ("red circle", "", 3.0)])]
    z4, v4 = render_batch(model, samples)
    assert (v4[0].astype(int) - v4[3].astype(int)).__abs__().mean() > 5  # seeds matter
    for i, sample in enumerate(samples):
        z1, v1 = render_batch(model, [sample])
        torch.testing.assert_close(z1[0], z4[i], atol=1e-5, rtol=0)
        assert np.abs(v1[0].astype(int) - v4[i].astype(int)).max() <= 2
        a, b = (decode_video(encode_mp4(v, crf=18)).astype(float) for v in (v1[0], v4[i]))
        assert a.shape == (9, 32, 32, 3) and np.abs(a - b).mean() < 1.0
    # vae_tile: the renderer decodes in tiles (16 px = 4 latents of the debug VAE: 2x2 tiles)
    from t2v.models.tiling import Tiling

    tiled, _ = RenderModel.load(package, vae_tile=16)
    assert tiled.tiling == Tiling(4) and model.tiling is None
    with torch.no_grad():
        want = model.vae.decode(z4[:1], tiling=Tiling(4))
        torch.testing.assert_close(tiled.decode(z4[:1]), want, rtol=0, atol=0)
        assert not torch.allclose(want, model.decode(z4[:1]), atol=1e-3)
    with pytest.raises(ValueError, match="one \\(frames, height, width, steps\\)"):
        render_batch(model, [samples[0], samples[1].model_copy(update={"steps": 3})])


# ----------------------------------------------------------------------------- jobs


BAD_JSONL = [  # (line text, expected reason substring)
    ('{"prompt": "valid full", "id": "full", "negative_prompt": "blurry", "seed": 11, '
     '"steps": 3, "cfg": 4.5, "frames": 5, "height": 16, "width": 24, "meta": {"k": [1]}}', None),
    ('{"prompt": "valid default"}', None),
    ('{"prompt": "broken', "invalid JSON"),
    ('{"id": "noprompt"}', "missing prompt"),
    ('{"prompt": "   "}', "empty prompt"),
    ('{"prompt": "x", "colour": "red"}', "unknown field 'colour'"),
    ('{"prompt": "x", "seed": "7"}', "seed: expected an integer"),
    ('{"prompt": "x", "frames": 8}', "frames=8 must be 1 + 4k"),
    ('{"prompt": "x", "height": 20}', "height=20 must be a multiple of 8"),
    ('{"prompt": "x", "steps": 0}', "steps=0 out of range"),
    ('{"prompt": "x", "cfg": 99}', "cfg=99.0 out of range"),
    ('{"prompt": "x", "id": "../x"}', "id '../x' must match"),
    ('{"prompt": "again", "id": "full"}', "repeated id 'full' (first on line 1)"),
    ('["prompt"]', "expected a JSON object"),
    ('{"prompt": "nul \\u0000 inside"}', "prompt contains a NUL"),
    (json.dumps({"prompt": LONG, "id": "long"}), "prompt has"),
]


def test_every_format_to_s3_with_every_bad_row(ray_local, package, s3_bucket):
    jsonl = "\n".join(t for t, _ in BAD_JSONL).encode() + b"\n"
    txt = (b"# comment\n\nred circle moving left\n\xff\xfe broken utf8\nnul\x00here\n"
           b"red circle moving left\nblue square\n")
    csv = (b'id,prompt,seed,cfg,meta\nc1,"a green, big star",4,1.0,"{""a"": 1}"\n'
           b"c2,two cells\nc3,x,abc,,\nc4,y,,,[1]\nc5,,,,\nc6,plain,,,\n")
    files = {".jsonl": jsonl, ".txt": txt, ".csv": csv}
    expect_errors = {
        ".jsonl": {i + 1: r for i, (_, r) in enumerate(BAD_JSONL) if r},
        ".txt": {4: "invalid UTF-8", 5: "NUL character", 6: "repeated id"},
        ".csv": {3: "2 cells, the header has 5", 4: "seed: expected an integer",
                 5: "meta: expected a JSON object", 6: "empty prompt"},
    }

    def render(fmt: str) -> dict:
        prompts = f"{s3_bucket}/in/prompts{fmt}"
        storage.write_bytes(prompts, files[fmt])
        extra = {"truncate": False} if fmt == ".jsonl" else {}
        extra |= {"num_per_prompt": 2} if fmt == ".csv" else {}
        return run_render_command(config(package, prompts, outs[fmt], **extra))

    # The three jobs at once, from one driver (each is mostly its one renderer's start-up).
    outs = {fmt: f"{s3_bucket}/out{fmt.replace('.', '-')}" for fmt in files}
    with ThreadPoolExecutor(len(files)) as pool:
        summaries = dict(zip(files, pool.map(render, files), strict=True))
    for fmt, summary in summaries.items():
        out = outs[fmt]
        rows = mf.read_manifest(out)
        errors = {r["line"]: r["error"] for r in rows if r["status"] == "error"}
        assert errors.keys() == expect_errors[fmt].keys(), (fmt, errors)
        for line, reason in expect_errors[fmt].items():
            assert reason in errors[line], (fmt, line, errors[line])
        ok = {r["id"]: r for r in rows if r["status"] == "ok"}
        assert summary["rendered"] == len(ok) and summary["failed"] == len(errors)
        assert summary["total_ok"] == len(ok) and summary["skipped"] == 0
        for row in ok.values():
            check_video(row)
            assert row["model"] == package and len(row["package_hash"]) == 64
            assert row["video"] == f"{out}/videos/{row['id']}.mp4"
            assert row["poster"] == f"{out}/posters/{row['id']}.png"
            assert row["sampler"] == "euler" and row["seconds"] > 0
        videos = storage.list_prefix(f"{out}/videos")
        assert sorted(videos) == sorted(r["video"] for r in ok.values())
        assert json.loads(storage.read_text(f"{out}/summary.json"))["rendered"] == len(ok)
        page = storage.read_text(f"{out}/index.html")
        assert page.count("<figure>") == len(ok) and page.count("<tr><td>") == len(errors)
        assert not storage.exists(f"{out}/.preflight")
        if fmt == ".jsonl":
            full = ok["full"]
            assert (full["frames"], full["height"], full["width"]) == (5, 16, 24)
            assert (full["seed"], full["steps"], full["cfg"]) == (11, 3, 4.5)
            assert full["negative_prompt"] == "blurry" and full["meta"] == {"k": [1]}
            assert len(ok) == 2 and errors[13].startswith("repeated id")
        if fmt == ".txt":
            assert {r["line"] for r in ok.values()} == {3, 7}
        if fmt == ".csv":  # two videos a row, seeds seed + k
            assert sorted(ok) == ["c1-0", "c1-1", "c6-0", "c6-1"]
            assert (ok["c1-0"]["seed"], ok["c1-1"]["seed"]) == (4, 5)
            assert ok["c1-0"]["prompt"] == "a green, big star" and ok["c1-0"]["meta"] == {"a": 1}


def test_fault_after_k_videos_then_resume_and_overwrite(ray_local, package, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"shape number {i}\n" for i in range(5)))
    out = str(tmp_path / "out")
    cfg = config(package, str(prompts), out, batch_size=1)
    with pytest.raises(Exception, match="fail_after=2"):  # raised inside the actor
        run_render_command(cfg.model_copy(update={"fail_after": 2}))
    # The actor died after its 2nd video was written, before that video's manifest row.
    assert len(storage.list_prefix(f"{out}/videos")) == 2 and len(ok_rows(out)) == 1

    summary = run_render_command(cfg)
    assert (summary["rendered"], summary["skipped"], summary["failed"]) == (4, 1, 0)
    ids = [r["id"] for r in ok_rows(out)]
    assert len(ids) == len(set(ids)) == 5  # exactly once, across all part files
    for row in ok_rows(out):
        check_video(row)
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(storage.TMP_PREFIX)]
    assert leftovers == [] and sorted(os.listdir(f"{out}/videos")) == sorted(
        f"{i}.mp4" for i in ids)

    again = run_render_command(cfg)  # nothing left: no actor starts
    assert (again["rendered"], again["skipped"]) == (0, 5)
    redo = run_render_command(cfg.model_copy(update={"overwrite": True}))
    assert (redo["rendered"], redo["skipped"], redo["total_ok"]) == (5, 0, 5)
    assert len(ok_rows(out)) == 10  # raw rows: two runs; the deduplicated view counts once
    ok, errors = mf.latest_rows(mf.read_manifest(out))
    assert sorted(ok) == sorted(ids) and not errors and all(r["run"] == redo["run"]
                                                              for r in ok.values())
    assert storage.read_text(f"{out}/index.html").count("<figure>") == 5


def test_package_render_defaults_set_every_row_without_flags(ray_local, package, tmp_path):
    """No size/fps/shift flags: each video takes the package's recorded geometry (not 9x32x32),
    a row's own size wins, and every manifest row records what it was rendered at."""
    odd = tmp_path / "odd-pkg"
    shutil.copytree(package, odd)
    meta = json.loads((odd / "model.json").read_text())
    meta["render"] = {"frames": 5, "height": 16, "width": 24, "fps": 12.0, "shift": 2.5,
                      "steps": 3, "cfg": 1.0, "sampler": "heun"}
    (odd / "model.json").write_text(json.dumps(meta))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "a red circle"}\n'
                       '{"id": "b", "prompt": "a blue square", "frames": 9, "height": 32}\n')
    out = str(tmp_path / "out")
    summary = run_render_command(RenderConfig(model=str(odd), prompts=str(prompts), out=out))
    assert summary["rendered"] == 2
    rows = {r["id"]: r for r in ok_rows(out)}
    assert [rows["a"][k] for k in ("frames", "height", "width")] == [5, 16, 24]
    assert [rows["b"][k] for k in ("frames", "height", "width")] == [9, 32, 24]
    for row in rows.values():
        check_video(row)
        assert (row["fps"], row["shift"], row["steps"], row["cfg"], row["sampler"]) == (
            12.0, 2.5, 3, 1.0, "heun")
    # Flags still win over the package.
    out = str(tmp_path / "out2")
    plan = plan_render(RenderConfig(model=str(odd), prompts=str(prompts), out=out, frames=9,
                                    steps=2, sampler="euler", dry_run=True))
    assert [(s.frames, s.steps) for s in plan.todo] == [(9, 2), (9, 2)]
    assert plan.job.sampler == "euler"

    # A package that records no geometry is one line naming the flags to give.
    del meta["render"]
    (odd / "model.json").write_text(json.dumps(meta | {"format_version": 1}))
    with pytest.raises(PackageError, match="records no render geometry") as info:
        plan_render(RenderConfig(model=str(odd), prompts=str(prompts), out=out, height=16,
                                 dry_run=True))
    assert "give --frames, --width" in str(info.value) and "\n" not in str(info.value)
    plan = plan_render(RenderConfig(model=str(odd), prompts=str(prompts), out=out, frames=5,
                                    height=16, width=16, dry_run=True))
    assert (plan.todo[0].frames, plan.job.fps, plan.job.shift) == (5, 8.0, 1.0)


def test_dry_run_renders_and_writes_nothing(package, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 4}\n{"prompt": ""}\n'
                       '{"prompt": "c", "frames": 1025, "height": 4096, "width": 4096}\n')
    out = tmp_path / "out"
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    report = run_render_command(config(package, str(prompts), str(out), dry_run=True,
                                       num_per_prompt=2))
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert (report["valid_rows"], report["error_rows"], report["to_render"]) == (3, 1, 6)
    # The largest size a row may ask for (~67M tokens) is costed from FLOPs, not run.
    assert "(1 shape; 1 larger from FLOPs at the timed rate)" in report["eta_method"]
    assert grew < 2**20 and report["eta_s"] > 1e4  # under 1 GiB more; days of work
    assert report["errors"] == [{"line": 3, "error": "empty prompt"}]
    assert not out.exists()
    assert "dry run: 4 lines, 3 valid, 1 errors; 6 videos to render" in capsys.readouterr().out


def test_whole_job_errors_are_early_and_one_line(package, moto_s3, s3_bucket, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    cases = [
        (config(str(tmp_path / "nope"), str(prompts), str(tmp_path / "o")),
         f"{tmp_path / 'nope'}: not a model package"),
        (config(package, str(tmp_path / "missing.txt"), str(tmp_path / "o")),
         f"{tmp_path / 'missing.txt'}: no such file or directory"),
        (config(package, str(prompts), "s3://t2v-no-such-bucket/out"),
         "s3://t2v-no-such-bucket/out/.preflight: bucket does not exist"),
        (config(package, str(tmp_path / "p.yaml"), str(tmp_path / "o")),
         "prompt file must end in .txt, .jsonl, .csv"),
    ]
    for cfg, message in cases:
        with pytest.raises((ValueError, storage.StorageError)) as info:
            run_render_command(cfg)
        assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()


CLI = """
import sys
from t2v import cli
sys.exit(cli.main(["render", *sys.argv[1:]]))
"""


def test_cli_missing_bucket_and_model_exit_2_with_one_line(package, moto_s3, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "1"}
    cases = [
        (["--model", package, "--out", "s3://t2v-no-such-bucket/o"],
         "t2v render: error: s3://t2v-no-such-bucket/o/.preflight: bucket does not exist"),
        (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
         f"t2v render: error: {tmp_path / 'nope'}: not a model package"),
    ]
    procs = [subprocess.Popen([sys.executable, "-c", CLI, "--prompts", str(prompts), *args],
                              cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for args, _ in cases]  # both at once
    for p, (_, message) in zip(procs, cases, strict=True):
        _, stderr = p.communicate(timeout=120)
        # cli.main logs at INFO, and botocore says where it found credentials at INFO: those
        # log records are not part of the error.
        lines = [x for x in stderr.strip().splitlines() if " botocore." not in x]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), stderr


NODE_LOSS = """
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from t2v import storage
from t2v.config import RenderConfig
from t2v.render.pipeline import run_render_command

package, prompts, out = sys.argv[1:4]
fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
        "health_check_failure_threshold": 3}
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": fast})
try:
    node_a = cluster.add_node(num_cpus=1)  # the head has no CPU: the renderer lands here
    cluster.connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    result = {}

    def job():
        try:
            result["summary"] = run_render_command(RenderConfig(
                model=package, prompts=prompts, out=out, steps=2, frames=9, height=32, width=32,
                batch_size=1, concurrency=[1, 1]))
        except BaseException as e:
            result["error"] = repr(e)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.time() + 90
    while thread.is_alive() and time.time() < deadline:
        parts = storage.list_prefix(storage.join(out, "manifest"))
        if parts:
            break
        time.sleep(0.1)
    cluster.remove_node(node_a)  # the renderer's node goes away, with the actor on it
    result["parts_after_removal"] = len(storage.list_prefix(storage.join(out, "manifest")))
    cluster.add_node(num_cpus=1)  # the replacement an autoscaler would bring
    thread.join(timeout=120)
    result["finished"] = not thread.is_alive()
    print("RESULT " + json.dumps(result), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_renderer_node_removed_mid_job(package, tmp_path):
    """Its own `ray.cluster_utils.Cluster` in a subprocess (the session cluster is a separate
    `ray start` cluster): the renderer's node goes away after its first batch, then a new node
    joins; Ray restarts the actor there and resends the lost batches; every prompt ends rendered
    exactly once."""
    from tests.conftest import CLUSTER_MARK, stop_processes

    prompts = tmp_path / "p.txt"
    n = 10
    prompts.write_text("".join(f"moving shape {i}\n" for i in range(n)))
    out = str(tmp_path / "out")
    ray_tmp = tempfile.mkdtemp(prefix="t2vrn", dir="/tmp")  # short: socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT), CLUSTER_MARK: ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        r = subprocess.run([sys.executable, "-c", NODE_LOSS, package, str(prompts), out],
                           cwd=ROOT, env=env, text=True, capture_output=True, timeout=240)
    finally:
        left = stop_processes(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the test's cluster still running: {left}"
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(lines[0][7:])
    assert result["finished"] and "error" not in result, result
    assert 1 <= result["parts_after_removal"] < n  # the node went away mid-job
    assert result["summary"]["rendered"] == n and result["summary"]["total_ok"] == n
    ids = [r["id"] for r in ok_rows(out)]
    assert len(ids) == len(set(ids)) == n
    for row in ok_rows(out):
        check_video(row)
