"""`t2v encode`: raw shards -> latent shards on a Ray Data actor pool, and the latent reader."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch

from t2v import storage
from t2v.config import EncodeConfig
from t2v.data.collate import LatentCollate
from t2v.data.encode import (
    check_encode_config,
    done_record,
    encode_settings,
    run_encode,
    run_encode_command,
)
from t2v.data.latents import (
    EMPTY_CAPTION,
    LATENT_FORMAT,
    decode_latent_rows,
    latent_stream,
    read_empty_caption,
)
from t2v.data.shards import iter_shard_samples, read_index, shard_uris, write_index, write_shard
from t2v.data.synthetic import Combo, clip_spec, render_clip
from t2v.data.video import decode_video, encode_mp4
from t2v.models.package import package_hash, save_package
from t2v.models.text import TextEncoder, TextEncoderConfig
from t2v.models.vae import CausalVideoVAE, vae_config

MAX_LENGTH = 16
FIELDS = {"latent.npy", "text.npy", "mask.npy", "txt", "json", "text_alt.npy", "mask_alt.npy"}


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T, H, W) in [-1, 1], as the encoder feeds the VAE."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def clip_bytes(i: int, frames: int, size: int = 32) -> bytes:
    spec = clip_spec(i, seed=5, frames=frames, size=size,
                     allowed=[Combo("green", "square", "left")])
    return encode_mp4(render_clip(spec), fps=8)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A VAE-only package (random weights; non-trivial latent scale/shift) and its VAE."""
    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config("debug", scale=0.7, shift=0.1)).eval()
    uri = str(tmp_path_factory.mktemp("pkg"))
    digest = save_package(uri, vae=vae, text=TextEncoderConfig(max_length=MAX_LENGTH))
    return uri, digest, vae


@pytest.fixture(scope="module")
def encoded(ray_local, shapes_shards, package, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    cfg = EncodeConfig(src=shapes_shards, out=out, vae=package[0], batch_size=4)
    return cfg, run_encode(cfg)


def test_encode_shapes_contract(encoded, shapes_shards, package):
    cfg, report = encoded
    _, digest, vae = package
    assert report["encoded"] == 24 and report["skipped"] == 0 and report["shards"] == 3
    names = [u.rsplit("/", 1)[1] for u in shard_uris(cfg.out)]
    assert names == [u.rsplit("/", 1)[1] for u in shard_uris(shapes_shards)]
    index = read_index(cfg.out)
    assert index["format"] == LATENT_FORMAT and index["total"] == 24
    assert [s["samples"] for s in index["shards"]] == [10, 10, 4]
    assert index["vae"] == {"uri": cfg.vae, "hash": digest}
    assert index["max_length"] == MAX_LENGTH and index["text_dim"] == 384
    assert index["latent_shapes"] == [[4, 3, 8, 8]] and index["skipped"] == 0
    # The index is written last: nothing in the output is newer.
    stamp = os.stat(storage.local_path(storage.join(cfg.out, "_index.json"))).st_mtime_ns
    assert all(os.stat(storage.local_path(u)).st_mtime_ns <= stamp
               for u in storage.list_prefix(cfg.out))

    raw = dict(iter_shard_samples(shard_uris(shapes_shards)))
    out = dict(iter_shard_samples(shard_uris(cfg.out)))
    assert set(out) == set(raw)
    # Each caption went through the text encoder once: 23 unique captions among 24 clips, and
    # the synthetic clips' 3 shorter captions each (json `captions`), many shared.
    captions = [f["txt"].decode() for f in raw.values()]
    alternatives = {k: json.loads(f["json"])["captions"] for k, f in raw.items()}
    every = captions + [a for alts in alternatives.values() for a in alts]
    assert len(set(captions)) == 23 and all(len(a) == 3 for a in alternatives.values())
    assert report["captions_encoded"] == len(set(every))
    assert report["caption_cache_hits"] == len(every) - len(set(every))
    text_encoder = TextEncoder(TextEncoderConfig(max_length=MAX_LENGTH))
    for key in sorted(out)[:4]:
        fields = out[key]
        assert set(fields) == FIELDS
        latent, text, mask = (npy(fields[m]) for m in ("latent.npy", "text.npy", "mask.npy"))
        assert latent.dtype == np.float16 and latent.shape == (4, 3, 8, 8)
        assert text.dtype == np.float16 and text.shape == (MAX_LENGTH, 384)
        assert mask.dtype == np.uint8 and mask.shape == (MAX_LENGTH,)
        assert fields["txt"] == raw[key]["txt"]
        meta, raw_meta = json.loads(fields["json"]), json.loads(raw[key]["json"])
        assert meta["source_key"] == key and meta["vae_hash"] == digest
        assert meta["latent_shape"] == [4, 3, 8, 8] and meta["frames"] == 9
        assert {k: meta[k] for k in ("colour", "shape", "motion")} == {
            k: raw_meta[k] for k in ("colour", "shape", "motion")}
        # The stored latent is the normalised posterior mean of the same decoded clip.
        x = pixels(decode_video(raw[key]["mp4"]))
        with torch.no_grad():
            ref = vae.encode_latents(x)[0]  # (C, T', H', W')
            np.testing.assert_allclose(latent.astype(np.float32), ref.numpy(), rtol=2e-3,
                                       atol=2e-3)
            # ... so decoding it gives what decoding the exact latent gives (fp16 aside).
            got = vae.decode(torch.from_numpy(latent).float()[None])
            torch.testing.assert_close(got, vae.decode(ref[None]), rtol=0, atol=5e-3)
            emb, ref_mask = text_encoder([fields["txt"].decode()])
        np.testing.assert_array_equal(mask, ref_mask[0].numpy().astype(np.uint8))
        np.testing.assert_allclose(text.astype(np.float32), emb[0].numpy(), rtol=2e-3,
                                   atol=2e-3)
        assert 0 < mask.sum() < MAX_LENGTH and not text[mask == 0].any()
        # The alternatives, in their order: (K, L, D) / (K, L), each as the encoder embeds it.
        alt_text, alt_mask = npy(fields["text_alt.npy"]), npy(fields["mask_alt.npy"])
        assert alt_text.dtype == np.float16 and alt_text.shape == (3, MAX_LENGTH, 384)
        assert alt_mask.dtype == np.uint8 and alt_mask.shape == (3, MAX_LENGTH)
        with torch.no_grad():
            emb, ref_mask = text_encoder(alternatives[key])
        np.testing.assert_array_equal(alt_mask, ref_mask.numpy().astype(np.uint8))
        np.testing.assert_allclose(alt_text.astype(np.float32), emb.numpy(), rtol=2e-3, atol=2e-3)
    # The index records the width that holds every caption's tokens (the reader trims to it).
    widths = [int(np.flatnonzero(npy(f["mask.npy"]))[-1]) + 1 for f in out.values()]
    assert index["text_tokens"] == max(widths) < MAX_LENGTH
    # ... and names the empty caption's embedding, what training gives a dropped caption: the
    # encoder's own output, float32, so a training driver need not load the encoder for it.
    assert index["empty_caption"] == EMPTY_CAPTION
    empty, empty_mask = read_empty_caption(cfg.out)
    with torch.no_grad():
        emb, ref_mask = text_encoder([""])
    assert empty.dtype == np.float32 and empty_mask.dtype == np.bool_
    np.testing.assert_array_equal(empty, emb[0].numpy())
    np.testing.assert_array_equal(empty_mask, ref_mask[0].numpy())


def test_latent_stream_batches(encoded):
    """Rows carry text only as wide as the index's text_tokens; the collate pads it back to the
    encoder's length, and the batch then holds exactly the stored arrays."""
    cfg, _ = encoded
    width = read_index(cfg.out)["text_tokens"]
    ds = latent_stream(cfg.out, shuffle_seed=1)
    assert ds.take(1)[0]["text"].shape == (width, 384)
    batches = list(ds.iter_torch_batches(batch_size=8,
                                         collate_fn=LatentCollate(text_length=MAX_LENGTH)))
    assert [len(b.keys) for b in batches] == [8, 8, 8]
    b = batches[0]
    assert b.latent.shape == (8, 4, 3, 8, 8) and b.latent.dtype == torch.float32
    assert b.text.shape == (8, MAX_LENGTH, 384) and b.text.dtype == torch.float32
    assert b.mask.shape == (8, MAX_LENGTH) and b.mask.dtype == torch.bool
    assert len({k for x in batches for k in x.keys}) == 24
    stored = dict(iter_shard_samples(shard_uris(cfg.out)))
    for x in batches:
        for j, key in enumerate(x.keys):
            np.testing.assert_array_equal(x.latent[j].numpy(), npy(
                stored[key]["latent.npy"]).astype(np.float32))
            np.testing.assert_array_equal(x.text[j].numpy(), npy(
                stored[key]["text.npy"]).astype(np.float32))
            np.testing.assert_array_equal(x.mask[j].numpy(), npy(stored[key]["mask.npy"]) > 0)
            assert x.captions[j] == stored[key]["txt"].decode()
    # Without a length the collate keeps the trimmed width (a masking DiT drops it anyway).
    short = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=LatentCollate())))
    assert short.text.shape == (4, width, 384) and short.mask.shape == (4, width)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_read_tasks_decode_rows_into_one_block_per_shape_and_skip_damage(capsys):
    """What a read task makes of a block of raw tar rows: stacked arrays equal to np.load's,
    one block per latent shape (a bucketed shard mixes them) in first-seen order, and a sample
    with a non-finite, cut or foreign member skipped with a line naming its shard and key."""
    from ray.data.block import BlockAccessor

    rng = np.random.default_rng(0)
    shapes = [(4, 3, 8, 8), (4, 5, 4, 6), (4, 3, 8, 8), (4, 5, 4, 6), (4, 3, 8, 8)]
    rows, arrays = [], {}
    for i, shape in enumerate(shapes):
        a = {"latent": rng.standard_normal(shape).astype(np.float16),
             "text": rng.standard_normal((16, 8)).astype(np.float16),
             "mask": (np.arange(16) < 3 + i).astype(np.uint8)}
        arrays[f"k{i}"] = a
        rows.append({"__key__": f"k{i}", "__url__": "s/shard-000003.tar",
                     "txt": f"cap {i}".encode(),
                     **{f"{c}.npy": _npy_bytes(v) for c, v in a.items()}})
    bad = np.full((16, 8), np.nan, np.float16)
    rows.append({**rows[0], "__key__": "nan", "text.npy": _npy_bytes(bad)})
    rows.append({**rows[0], "__key__": "cut", "latent.npy": rows[0]["latent.npy"][:-7]})
    pickled = io.BytesIO()
    np.save(pickled, np.array([1, "x"], dtype=object), allow_pickle=True)
    rows.append({**rows[0], "__key__": "pickle", "mask.npy": pickled.getvalue()})
    blocks = decode_latent_rows(rows)
    said = capsys.readouterr().out
    assert [b.num_rows for b in blocks] == [3, 2]
    assert [r["key"] for b in blocks for r in b.to_pylist()] == ["k0", "k2", "k4", "k1", "k3"]
    for b in blocks:
        batch = BlockAccessor.for_block(b).to_numpy()
        for j, key in enumerate(batch["key"]):
            for c in ("latent", "text", "mask"):
                np.testing.assert_array_equal(batch[c][j], arrays[key][c])
            assert batch["caption"][j] == f"cap {key[1]}"
    for key, reason in (("nan", "text: non-finite"), ("cut", "latent: 1529 data bytes"),
                        ("pickle", "mask: an object array")):
        line = next(x for x in said.splitlines() if f":{key}:" in x)
        assert "s/shard-000003.tar" in line and reason in line
    # With text_tokens the rows keep that many positions; a token past them is damage.
    trimmed = decode_latent_rows(rows[:5], text_tokens=6)  # k4 has 7 tokens
    said = capsys.readouterr().out
    batch = BlockAccessor.for_block(trimmed[0]).to_numpy()
    assert batch["text"].shape == (2, 6, 8) and batch["mask"].shape == (2, 6)
    np.testing.assert_array_equal(batch["text"][1], arrays["k2"]["text"][:6])
    assert [r["key"] for b in trimmed for r in b.to_pylist()] == ["k0", "k2", "k1", "k3"]
    assert "k4: mask: a token past the index's text_tokens=6" in said


def test_alternative_captions_read_and_padded_by_the_collate(capsys):
    """text_alt / mask_alt: a sample without them reads as K = 0; blocks split by K; the
    collate pads a batch mixing K (Ray's ragged columns) to its largest K and L with zeros /
    False; alternatives whose shape does not fit the caption's are damage."""
    from ray.data._internal.arrow_ops.transform_pyarrow import concat
    from ray.data.block import BlockAccessor

    rng = np.random.default_rng(1)
    rows, arrays = [], {}
    for i, k in enumerate([2, 0, 1]):
        a = {"latent": rng.standard_normal((4, 3, 8, 8)).astype(np.float16),
             "text": rng.standard_normal((16, 8)).astype(np.float16),
             "mask": (np.arange(16) < 4).astype(np.uint8),
             "text_alt": rng.standard_normal((k, 16, 8)).astype(np.float16),
             "mask_alt": (np.arange(16)[None] < 2 + np.arange(k)[:, None]).astype(np.uint8)}
        a["text_alt"] *= a["mask_alt"][..., None]  # zero past each caption's tokens, as encoded
        arrays[f"k{i}"] = a
        stored = a if k else {c: a[c] for c in ("latent", "text", "mask")}
        rows.append({"__key__": f"k{i}", "__url__": "s/shard-000000.tar", "txt": b"cap",
                     **{f"{c}.npy": _npy_bytes(v) for c, v in stored.items()}})
    rows.append({**rows[0], "__key__": "misfit",
                 "text_alt.npy": _npy_bytes(np.zeros((2, 15, 8), np.float16))})
    blocks = decode_latent_rows(rows, text_tokens=8)
    assert "misfit: text_alt: shape (2, 15, 8)" in capsys.readouterr().out
    assert [[r["key"] for r in b.to_pylist()] for b in blocks] == [["k0"], ["k1"], ["k2"]]
    batch = BlockAccessor.for_block(concat(blocks)).to_numpy()
    got = LatentCollate(text_length=16)(batch)
    assert got.alt_text.shape == (3, 2, 16, 8) and got.alt_mask.shape == (3, 2, 16)
    for j, key in enumerate(got.keys):
        a, k = arrays[key], len(arrays[key]["text_alt"])
        np.testing.assert_array_equal(got.alt_text[j, :k].numpy(), a["text_alt"].astype(np.float32))
        np.testing.assert_array_equal(got.alt_mask[j, :k].numpy(), a["mask_alt"] > 0)
        assert not got.alt_text[j, k:].any() and not got.alt_mask[j, k:].any()
    # A batch where no sample has alternatives carries none.
    plain = LatentCollate()(BlockAccessor.for_block(blocks[1]).to_numpy())
    assert plain.alt_text is None and plain.alt_mask is None


def test_rerun_resumes_and_recomputes_a_deleted_shard(encoded):
    cfg, _ = encoded
    before = {u: storage.read_bytes(u) for u in shard_uris(cfg.out)}
    report = run_encode(cfg)  # all done: no actor starts
    assert report["resumed_shards"] == 3 and report["encoded_this_run"] == 0
    assert report["encoded"] == 24 and report["captions_encoded"] == 0
    assert read_index(cfg.out)["vae"]["hash"] == package_hash(cfg.vae)
    victim = storage.join(cfg.out, "shard-000001.tar")
    storage.delete(victim)
    report = run_encode(cfg)
    assert report["resumed_shards"] == 2 and report["encoded_this_run"] == 10
    assert {u: storage.read_bytes(u) for u in shard_uris(cfg.out)} == before  # deterministic
    assert read_index(cfg.out)["total"] == 24
    # Other settings (or another package) make every old shard stale.
    existing = set(storage.list_prefix(cfg.out))
    for change in ({}, {"frames": 5}, {"text_max_length": 8}, {"sample": True}):
        other = cfg.model_copy(update=change)
        settings = encode_settings(other, check_encode_config(other))
        stale = [done_record(other, n, settings, existing) is None
                 for n in ("shard-000000.tar", "shard-000001.tar")]
        assert stale == [bool(change)] * 2, change


def test_bad_samples_skipped_and_captions_encoded_once(ray_local, package, tmp_path):
    """Corrupt, too short and captionless samples are counted; repeated captions encode once."""
    src, out = str(tmp_path / "raw"), str(tmp_path / "latents")
    good = clip_bytes(0, frames=9)
    first = [("a", {"mp4": good, "txt": b"a red circle"}),
             ("b", {"mp4": clip_bytes(1, frames=12), "txt": b"a red circle"}),
             ("broken", {"mp4": b"this is not a video", "txt": b"a blue square"}),
             ("c", {"mp4": good, "txt": b"a blue square"}),
             ("short", {"mp4": clip_bytes(2, frames=3), "txt": b"a red circle"})]
    second = [("d", {"mp4": good, "txt": b"a blue square"}),
              ("mute", {"mp4": good}),
              ("e", {"mp4": good, "txt": b"a red circle", "json": b'{"colour": "green"}'}),
              ("f", {"mp4": good, "txt": b"a red circle", "json": b'{"captions": "a circle"}'}),
              ("g", {"mp4": good, "txt": b"a blue square",
                     "json": b'{"captions": ["a square", " ", "a blue square", "a square "]}'})]
    write_shard(storage.join(src, "shard-000000.tar"), first)
    write_shard(storage.join(src, "shard-000001.tar"), second)
    # A tar cut off mid-member (an interrupted copy): what precedes the cut is still usable.
    write_shard(str(tmp_path / "whole.tar"), [(f"t{i}", second[0][1]) for i in range(3)])
    whole = (tmp_path / "whole.tar").read_bytes()
    cut = whole.index(b"t1.mp4") + 512 + 100  # inside t1's video data
    storage.write_bytes(storage.join(src, "shard-000002.tar"), whole[:cut])
    write_index(src, [{"name": f"shard-00000{i}.tar", "samples": n}
                      for i, n in enumerate([5, 5, 3])])
    report = run_encode(EncodeConfig(src=src, out=out, vae=package[0], frames=5, size=16))
    reasons = {s["key"]: s["reason"] for s in report["skips"]}
    assert reasons.pop("*").startswith("unreadable tar")
    assert report["encoded"] == 5 + 2 and report["skipped"] == 5
    # "a red circle", "a blue square" and g's one usable alternative, "a square"
    assert report["captions_encoded"] == 3 and report["caption_cache_hits"] == 8 - 3
    assert set(reasons) == {"broken", "short", "mute", "f"}
    assert reasons["f"] == "json captions: expected a list of strings"
    assert reasons["broken"].startswith("undecodable video")
    assert reasons["short"] == "too short: 3 < 5 frames" and reasons["mute"].startswith(
        "no caption")
    assert report["skip_reasons"] == {"undecodable video": 1, "too short": 1,
                                      "no caption (txt member)": 1, "unreadable tar": 1,
                                      "json captions": 1}
    on_disk = json.loads(storage.read_text(storage.join(out, "encode_report.json")))
    assert on_disk["skipped"] == 5 and read_index(out)["skipped"] == 5
    samples = dict(iter_shard_samples(shard_uris(out)))
    assert sorted(samples) == ["a", "b", "c", "d", "e", "g", "t0"]
    # g's alternatives: blank, repeated and the caption itself left out; none for the others.
    assert npy(samples["g"]["text_alt.npy"]).shape == (1, MAX_LENGTH, 384)
    with torch.no_grad():
        emb, _ = TextEncoder(TextEncoderConfig(max_length=MAX_LENGTH))(["a square"])
    np.testing.assert_allclose(npy(samples["g"]["text_alt.npy"])[0].astype(np.float32),
                               emb[0].numpy(), rtol=2e-3, atol=2e-3)
    assert "text_alt.npy" not in samples["a"] and "mask_alt.npy" not in samples["d"]
    assert npy(samples["b"]["latent.npy"]).shape == (4, 2, 4, 4)  # 5 frames of 16x16
    assert json.loads(samples["e"]["json"])["colour"] == "green"
    # Same caption, same stored embedding, wherever it came from (cache or encoder).
    assert samples["a"]["text.npy"] == samples["e"]["text.npy"]


def test_s3_in_and_out(ray_local, moto_s3, s3_bucket, package):
    src, out = storage.join(s3_bucket, "raw"), storage.join(s3_bucket, "latents")
    vae = storage.join(s3_bucket, "pkg")  # the same package, on S3: the same hash
    assert save_package(vae, vae=package[2], text=TextEncoderConfig(max_length=MAX_LENGTH)) == (
        package[1])
    write_shard(storage.join(src, "shard-000000.tar"),
                [(f"k{i}", {"mp4": clip_bytes(i, frames=12, size=24), "txt": b"a clip"})
                 for i in range(3)])
    result = run_encode_command(EncodeConfig(src=src, out=out, vae=vae))
    assert result["encoded"] == 3 and "skips" not in result
    index = read_index(out)
    assert index["vae"] == {"uri": vae, "hash": package[1]}
    assert index["latent_shapes"] == [[4, 3, 6, 6]]  # 12 frames cut to 1 + 4k = 9
    assert storage.exists(storage.join(out, "encode_config.yaml"))
    batches = list(latent_stream(out).iter_torch_batches(batch_size=3,
                                                         collate_fn=LatentCollate()))
    assert len(batches) == 1 and batches[0].latent.shape == (3, 4, 3, 6, 6)
    assert sorted(batches[0].keys) == ["k0", "k1", "k2"]
    # A list of shard URIs (training's split) reads just those.
    rows = latent_stream(shard_uris(out)).take_all()
    assert sorted(r["key"] for r in rows) == ["k0", "k1", "k2"]
    assert rows[0]["latent"].dtype == np.float16 and rows[0]["mask"].dtype == np.uint8


def test_config_refusals(package, tmp_path):
    ok = dict(src=str(tmp_path / "raw"), out=str(tmp_path / "lat"), vae=package[0])
    check_encode_config(EncodeConfig(**ok))
    with pytest.raises(ValueError, match="frames=6 must be 1 \\+ 4k"):
        check_encode_config(EncodeConfig(**ok | {"frames": 6}))
    with pytest.raises(ValueError, match="size=18 must be a multiple of spatial_down=4"):
        check_encode_config(EncodeConfig(**ok | {"size": 18}))
    with pytest.raises(ValueError, match="inside src"):
        check_encode_config(EncodeConfig(**ok | {"out": str(tmp_path / "raw" / "lat")}))
    with pytest.raises(ValueError, match="encode needs vae"):
        check_encode_config(EncodeConfig(**ok | {"vae": ""}))
    write_index(str(tmp_path / "rawset"), [])  # a raw data set's index
    with pytest.raises(ValueError, match="not latent shards"):
        latent_stream(str(tmp_path / "rawset"))
