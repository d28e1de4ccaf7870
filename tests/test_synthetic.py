"""The shapes generator: vocabulary, determinism, held-out exclusion, ground truth."""

import json

import numpy as np
import pytest

from t2v.data import synthetic as S
from t2v.data.video import decode_video


def test_vocabulary_sizes():
    assert len(S.COLOURS) >= 6 and len(S.SHAPES) == 3
    assert set(S.MOTIONS) == {"left", "right", "up", "down", "still"}
    assert len(S.all_combos()) == len(S.COLOURS) * 3 * 5


def test_captions_use_vocabulary_words():
    allowed = S.all_combos()
    for i in range(50):
        spec = S.clip_spec(i, seed=3, frames=9, size=32, allowed=allowed, two_object_prob=0.5)
        words = spec.caption.replace(",", " ").split()
        for obj in spec.objects:
            assert obj.colour in words and obj.shape in words and obj.motion in words


def test_deterministic_per_seed():
    a = list(S.generate_samples(4, seed=7, frames=5, size=24))
    b = list(S.generate_samples(4, seed=7, frames=5, size=24))
    c = list(S.generate_samples(4, seed=8, frames=5, size=24))
    assert a == b
    assert [x[1]["mp4"] for x in a] != [x[1]["mp4"] for x in c]


def test_exclude_and_only():
    held = [str(c) for c in S.heldout_combos(12)]
    assert len(set(held)) == 12
    train = S.allowed_combos(exclude=held)
    assert not set(map(str, train)) & set(held)
    for i in range(200):
        spec = S.clip_spec(i, seed=0, frames=5, size=32, allowed=train, two_object_prob=0.5)
        for o in spec.objects:
            assert f"{o.colour} {o.shape} {o.motion}" not in held
    only = S.allowed_combos(only=held[:3])
    assert sorted(map(str, only)) == sorted(held[:3])
    with pytest.raises(ValueError, match="unknown colour"):
        S.Combo.parse("pink circle left")
    with pytest.raises(ValueError, match="no colour/shape/motion"):
        S.allowed_combos(exclude=held[:1], only=held[:1])


def test_heldout_covers_each_word_in_training():
    held = set(map(str, S.heldout_combos(12)))
    train = [c for c in S.all_combos() if str(c) not in held]
    assert {c.colour for c in train} == set(S.COLOURS)
    assert {c.shape for c in train} == set(S.SHAPES)
    assert {c.motion for c in train} == set(S.MOTIONS)


@pytest.mark.parametrize("motion", S.MOTIONS)
def test_motion_and_colour_ground_truth_visible_in_pixels(motion):
    combo = S.Combo("red", "square", motion)
    spec = S.clip_spec(0, seed=1, frames=9, size=32, allowed=[combo])
    clip = S.render_clip(spec).astype(np.float32)
    # The object's pixels are the ones far from the background grey.
    diff = np.abs(clip - np.asarray(spec.background, np.float32)).sum(-1) > 60
    ys, xs = np.nonzero(diff[0])
    ye, xe = np.nonzero(diff[-1])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    ex, ey = S.MOTION_VECTORS[motion]
    if motion == "still":
        assert abs(dx) < 0.5 and abs(dy) < 0.5
    else:
        assert dx * ex + dy * ey > 0.3 * 32 * 0.9  # moved a third of the frame that way
    # Whole object stays inside the frame (no clipping at the borders).
    for t in range(9):
        m = diff[t]
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    centre = clip[0][diff[0]].mean(0)
    assert np.abs(centre - np.asarray(S.COLOURS["red"])).max() < 40


def test_sample_fields_round_trip():
    (key, fields), = S.generate_samples(1, seed=2, frames=9, size=32, start=5)
    meta = json.loads(fields["json"])
    assert meta["key"] == key and meta["index"] == 5
    assert fields["txt"].decode() == meta["caption"]
    video = decode_video(fields["mp4"])
    assert video.shape == (9, 32, 32, 3)
    spec = S.clip_spec(5, seed=2, frames=9, size=32, allowed=S.all_combos())
    assert np.abs(video.astype(float) - S.render_clip(spec)).mean() < 4.0


def test_travel_sets_the_path_length_and_is_checked():
    """`travel`: a moving object's path over the clip, as fractions of the frame side (the
    default draws are unchanged); the config refuses a range the detector could call still."""
    from t2v.config import SynthConfig

    allowed = S.allowed_combos((), ())
    for travel in ((0.2, 0.2), (0.4, 0.4)):
        for i in range(20):
            spec = S.clip_spec(i, seed=3, frames=9, size=32, allowed=allowed, travel=travel)
            obj = spec.objects[0]
            path = obj.speed * (9 - 1)
            assert path == pytest.approx(0.0 if obj.motion == "still" else travel[0] * 32)
    assert S.clip_spec(5, seed=3, frames=9, size=32, allowed=allowed) == S.clip_spec(
        5, seed=3, frames=9, size=32, allowed=allowed, travel=S.TRAVEL)
    assert SynthConfig().travel == S.TRAVEL
    with pytest.raises(ValueError, match="travel must be"):
        SynthConfig(travel=(0.3, 0.2))


def test_radius_sets_the_object_size_and_paths_stay_in_the_frame():
    """`radius`: an object's half extent as fractions of the frame side (default draws
    unchanged); with the demo's large objects every path stays inside the frame (one longer
    than the frame leaves is shortened, never below the detector's "still" line), and the config
    refuses a size whose shortest path cannot fit."""
    from t2v.config import SynthConfig

    allowed = S.allowed_combos((), ())
    rng = np.random.default_rng([3, 5])  # clip 5 of seed 3 draws its combo, then its radius
    rng.integers(len(allowed))
    default = S.clip_spec(5, seed=3, frames=9, size=32, allowed=allowed)
    assert default.objects[0].radius == pytest.approx(rng.uniform(0.14, 0.2) * 32)
    radius, travel, size = (0.25, 0.3), (0.3, 0.4), 32
    for i in range(200):
        spec = S.clip_spec(i, seed=4, frames=9, size=size, allowed=allowed, travel=travel,
                           radius=radius, two_object_prob=0.5)
        for obj in spec.objects:
            assert radius[0] * size <= obj.radius <= radius[1] * size
            if obj.motion != "still":
                assert 0.15 * size < obj.speed * 8 <= travel[1] * size
            for t in (0, 8):  # a path is a straight line: its ends bound it
                x, y = obj.centre(t)
                assert obj.radius <= min(x, y) and max(x, y) <= size - obj.radius, (i, obj, t)
        # the object is drawn that large: its mask covers about a square's or circle's area
        main = spec.objects[0]
        area = (S.render_clip(spec)[0].astype(int) != spec.background).any(-1).sum()
        assert area > (0.5 if main.shape == "triangle" else 2.5) * (radius[0] * size) ** 2
    assert SynthConfig().radius == S.RADIUS
    assert SynthConfig(radius=radius, travel=travel).radius == radius
    with pytest.raises(ValueError, match="leaves it"):
        SynthConfig(radius=(0.25, 0.35), travel=(0.3, 0.4))
    with pytest.raises(ValueError, match="radius must be"):
        SynthConfig(radius=(0.3, 0.2))


def test_alternative_captions_leave_out_colour_motion_or_both():
    """Each clip's json `captions`: without its colour, without its motion, its shape alone
    (every object of a two-object clip alike), the words of the clip's own template."""
    allowed = S.allowed_combos()
    for i in range(40):
        spec = S.clip_spec(i, seed=3, frames=9, size=32, allowed=allowed, two_object_prob=0.5)
        no_colour, no_motion, shape_only = spec.alternative_captions
        words = lambda text: set(text.split())  # noqa: E731
        for obj in spec.objects:
            assert obj.shape in words(no_colour) & words(no_motion) & words(shape_only)
            assert obj.colour not in words(no_colour) | words(shape_only)
            assert obj.colour in words(no_motion) and obj.colour in words(spec.caption)
            assert obj.motion not in words(no_motion) | words(shape_only)
            moving = obj.motion != "still"
            assert not moving or obj.motion in words(no_colour)
        assert shape_only.count(" and ") == len(spec.objects) - 1
    plain = dict(S.generate_samples(1, seed=3, frames=9, size=32))
    assert "captions" not in json.loads(next(iter(plain.values()))["json"])  # unless asked
    fields = dict(S.generate_samples(1, seed=3, frames=9, size=32, alt_captions=True))
    meta = json.loads(next(iter(fields.values()))["json"])
    assert meta["captions"] == S.clip_spec(0, seed=3, frames=9, size=32,
                                         allowed=allowed).alternative_captions
