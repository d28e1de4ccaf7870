"""`t2v pack`: a folder of assorted videos -> raw shards, with bad files skipped and reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from t2v import storage
from t2v.config import PackConfig, ReaderConfig
from t2v.data.pack import run_pack
from t2v.data.shards import iter_shard_samples, read_index, shard_uris
from t2v.data.streaming import video_stream
from t2v.data.synthetic import Combo, clip_spec, render_clip
from t2v.data.video import decode_video, encode_mp4, encode_video
from tests.s3_fixtures import copy_tree


def clip(i: int, frames: int = 12, size: int = 40) -> np.ndarray:
    spec = clip_spec(i, seed=9, frames=frames, size=size,
                     allowed=[Combo("blue", "circle", "right")])
    return render_clip(spec)


@pytest.fixture()
def video_folder(tmp_path):
    """Good videos in several containers/codecs, captions three ways, and four bad files."""
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    good = {
        "a.mp4": encode_mp4(clip(0), fps=8),
        "nested/b.webm": encode_video(clip(1), fps=8, codec="libvpx-vp9", container_format="webm"),
        "c.mkv": encode_video(clip(2), fps=8, codec="libx264", container_format="matroska"),
        "d.mov": encode_video(clip(3), fps=8, codec="libx264", container_format="mov"),
        "e.avi": encode_video(clip(4), fps=8, codec="mpeg4", container_format="avi"),
        "short.mp4": encode_mp4(clip(5, frames=2), fps=8),
    }
    for name, data in good.items():
        (src / name).write_bytes(data)
    (src / "empty.mp4").write_bytes(b"")
    (src / "truncated.mp4").write_bytes(good["a.mp4"][: len(good["a.mp4"]) // 2])
    (src / "notes.mp4").write_text("this is a text file, not a video\n")
    (src / "nocaption.mp4").write_bytes(good["a.mp4"])
    # Captions: a table for most, a sidecar for one, none for nocaption.mp4.
    rows = [{"path": p, "caption": f"caption of {p}"} for p in
            ["a.mp4", "c.mkv", "d.mov", "e.avi", "short.mp4", "empty.mp4", "truncated.mp4",
             "notes.mp4"]]
    rows[0]["captions"] = ["a short one", "another"]  # alternatives, for alt_caption_prob
    (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (src / "nested" / "b.txt").write_text("sidecar caption of b\n")
    return src


def test_pack_folder(ray_local, video_folder, tmp_path):
    out = str(tmp_path / "shards")
    cfg = PackConfig(src=str(video_folder), out=out, shard_size=2, fps=8, frames=8,
                     min_frames=4, size=[32, 32])
    report = run_pack(cfg)
    assert report["found"] == 10 and report["packed"] == 5 and report["skipped"] == 5
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in report["skips"]}
    assert set(reasons) == {"empty.mp4", "truncated.mp4", "notes.mp4", "nocaption.mp4",
                            "short.mp4"}
    assert "too short" in reasons["short.mp4"] and "no caption" in reasons["nocaption.mp4"]
    assert "empty" in reasons["empty.mp4"]
    assert all("\n" not in r for r in reasons.values())
    # The report and index are on disk; the index is consistent with the tars.
    on_disk = json.loads(storage.read_text(storage.join(out, "pack_report.json")))
    assert on_disk["packed"] == 5
    index = read_index(out)
    samples = dict(iter_shard_samples(shard_uris(out)))
    assert index["total"] == len(samples) == 5
    assert set(samples) == {"a", "nested_b", "c", "d", "e"}
    assert samples["nested_b"]["txt"].decode() == "sidecar caption of b"
    assert samples["e"]["txt"].decode() == "caption of e.avi"
    assert json.loads(samples["a"]["json"])["captions"] == ["a short one", "another"]
    assert "captions" not in json.loads(samples["e"]["json"])
    for key, fields in samples.items():
        video = decode_video(fields["mp4"])
        assert video.shape == (8, 32, 32, 3), key
        meta = json.loads(fields["json"])
        assert meta["frames"] == 8 and meta["source"].endswith(
            {"nested_b": "b.webm", "a": "a.mp4", "c": "c.mkv", "d": "d.mov", "e": "e.avi"}[key])
    # And the packed shards stream through the Ray Data reader.
    stream = video_stream(ReaderConfig(shards=out, frames=8))
    assert sum(len(b.keys) for b in stream.iter_batches(2)) == 5


def test_pack_resumes_finished_shards(ray_local, video_folder, tmp_path, capsys):
    out = str(tmp_path / "shards")
    cfg = PackConfig(src=str(video_folder), out=out, shard_size=3, frames=8, size=[32, 32])
    first = run_pack(cfg)
    before = {u: storage.read_bytes(u) for u in shard_uris(out)}
    capsys.readouterr()
    second = run_pack(cfg)
    assert capsys.readouterr().out.count("(resumed)") == 4  # 10 videos / 3 per shard
    assert second["packed"] == first["packed"] and second["skipped"] == first["skipped"]
    assert {u: storage.read_bytes(u) for u in shard_uris(out)} == before


def test_pack_to_and_from_s3(ray_local, moto_s3, s3_bucket, video_folder):
    src = copy_tree(str(video_folder), storage.join(s3_bucket, "raw"))
    out = storage.join(s3_bucket, "shards")
    report = run_pack(PackConfig(src=src, out=out, shard_size=4, frames=8, size=[32, 32]))
    assert report["packed"] == 6 and report["skipped"] == 4  # short.mp4 passes min_frames=1
    assert storage.exists(storage.join(out, "_index.json"))


def test_pack_errors(ray_local, tmp_path):
    with pytest.raises(storage.StorageError, match="does not exist"):
        run_pack(PackConfig(src=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    src = tmp_path / "s"
    src.mkdir()
    (src / "captions.csv").write_text("file,text\n")
    with pytest.raises(ValueError, match=r"captions.csv:1: header"):
        run_pack(PackConfig(src=str(src), out=str(tmp_path / "o")))
    (src / "captions.jsonl").write_text('{"path": "a.mp4", "caption": "x"}\n'
                                        '{"path": "b.mp4", "caption": "y", "captions": "z"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:2: captions: expected a list of "):
        run_pack(PackConfig(src=str(src), out=str(tmp_path / "o"),
                            captions=str(src / "captions.jsonl")))
