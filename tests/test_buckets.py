"""Duration/resolution buckets (t2v/data/buckets.py): parsing, presets, choosing, batching."""

from __future__ import annotations

import numpy as np
import pytest

from t2v.data.buckets import (
    BUCKET_PRESETS,
    Bucket,
    batches_by_shape,
    choose_bucket,
    kept_share,
    parse_buckets,
)


def test_parse_presets_and_lists():
    assert parse_buckets("9x32x48, 9x32x32,9x32x32") == (Bucket(9, 32, 32), Bucket(9, 32, 48))
    assert parse_buckets(["17x48x32"]) == (Bucket(17, 48, 32),)
    assert parse_buckets("debug") == BUCKET_PRESETS["debug"]
    assert Bucket(17, 32, 48).name == "17x32x48"
    for bad, message in (("huge", "not a preset"), ("9x32", "FRAMESxHEIGHTxWIDTH"),
                         ("0x32x32", "frames >= 1"), ("", "give a preset")):
        with pytest.raises(ValueError, match=message):
            parse_buckets(bad)
    debug = BUCKET_PRESETS["debug"]
    assert max(b.frames for b in debug) <= 17 and max(max(b.height, b.width) for b in debug) <= 64
    for name, buckets in BUCKET_PRESETS.items():
        for b in buckets:  # the causal VAE takes 1 + 4k frames; sides fit VAE x patch
            assert (b.frames - 1) % 4 == 0 and b.height % 16 == 0 and b.width % 16 == 0, (name, b)
    p480 = BUCKET_PRESETS["480p"]
    assert Bucket(81, 480, 832) in p480 and Bucket(81, 832, 480) in p480
    assert all(3.5e5 < b.height * b.width < 4.2e5 for b in p480)


def test_choose_keeps_the_most_of_each_clip():
    debug = BUCKET_PRESETS["debug"]
    # Landscape, portrait, square: the bucket of their own aspect, as long as they allow.
    assert choose_bucket(40, 360, 640, debug) == Bucket(17, 32, 48)  # 16:9: 3:2 is nearest
    assert choose_bucket(40, 640, 360, debug) == Bucket(17, 48, 32)
    assert choose_bucket(40, 480, 640, debug) == Bucket(17, 48, 64)  # 4:3
    assert choose_bucket(12, 100, 100, debug) == Bucket(9, 48, 48)  # 12 frames: 9 fit, 17 not
    assert choose_bucket(17, 200, 300, debug) == Bucket(17, 32, 48)  # 3:2 exactly
    # Equal shares: the largest bucket the clip covers without upscaling, else the smallest.
    assert choose_bucket(9, 40, 40, debug) == Bucket(9, 32, 32)
    assert choose_bucket(9, 20, 20, debug) == Bucket(9, 32, 32)
    assert choose_bucket(9, 480, 480, debug) == Bucket(9, 48, 48)
    with pytest.raises(ValueError, match="too short: 5 frames < 9, the shortest bucket's"):
        choose_bucket(5, 64, 64, debug)
    # The formula: aspect share x time share, the best of every bucket that fits.
    assert choose_bucket(100, 720, 1280, BUCKET_PRESETS["480p"]) == Bucket(81, 480, 832)
    assert choose_bucket(60, 1080, 1080, BUCKET_PRESETS["480p"]) == Bucket(49, 624, 624)
    clip = (30, 90, 160)
    assert kept_share(Bucket(17, 48, 64), *clip) == pytest.approx(
        (4 / 3) / (16 / 9) * 17 / 30)
    assert all(kept_share(b, *clip) <= kept_share(choose_bucket(*clip, debug), *clip)
               for b in debug if b.frames <= 30)


def test_batches_by_shape_never_mix_and_drop_only_part_full_buckets():
    rng = np.random.default_rng(0)
    shapes = [(4, 3, 8, 8), (4, 3, 8, 12), (4, 5, 12, 8)]
    rows = [int(rng.integers(0, 3)) for _ in range(101)]

    def stream():  # Ray's numpy batches of 8: ragged ones as object arrays
        for i in range(0, len(rows), 8):
            chunk = rows[i:i + 8]
            latent = np.empty(len(chunk), dtype=object)
            latent[:] = [np.full(shapes[s], k + i, np.float16) for k, s in enumerate(chunk)]
            yield {"latent": latent, "key": np.array([f"k{i + k}" for k in range(len(chunk))])}

    out = list(batches_by_shape(stream(), "latent", 4))
    seen = []
    for b in out:
        assert b["latent"].dtype == np.float16 and b["latent"].shape[0] == 4
        assert b["latent"].shape[1:] in shapes and len(b["key"]) == 4
        seen += [int(k[1:]) for k in b["key"]]
        for j, k in enumerate(b["key"]):  # each row stayed with its key
            assert b["latent"][j].flat[0] == int(k[1:])
    assert len(seen) == len(set(seen))
    per_shape = {s: rows.count(s) for s in range(3)}
    assert len(seen) == sum(4 * (n // 4) for n in per_shape.values())  # < 4 left per bucket


def test_bucket_shuffle_buffer_is_seeded_and_loses_nothing():
    def stream():
        for i in range(0, 40, 8):
            yield {"latent": np.stack([np.full((2, 2), k, np.float32) for k in range(i, i + 8)]),
                   "key": np.array([f"k{k}" for k in range(i, i + 8)])}

    def keys(**kw):
        return [k for b in batches_by_shape(stream(), "latent", 4, **kw) for k in b["key"]]

    plain, a, b = keys(), keys(shuffle_buffer=16, seed=1), keys(shuffle_buffer=16, seed=1)
    assert plain == [f"k{k}" for k in range(40)]
    assert a == b and a != plain and sorted(a) == sorted(plain)
    assert keys(shuffle_buffer=16, seed=2) != a
