"""t2v.data.video: encode/decode round trips, resampling, cropping, containers, bad input."""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from t2v.data.video import (
    VideoDecodeError,
    VideoInfo,
    contact_sheet,
    decode_video,
    encode_mp4,
    encode_video,
    probe_video,
    to_gif,
    to_png,
    to_webp,
)

# Measured 2.58 for `moving_clip()` at crf 18 (PyAV 18.1 / x264); the margin covers other x264
# builds, and stays under 5.4, the error of returning each frame's neighbour instead.
ROUND_TRIP_MAE = 4.0


def moving_clip(t: int = 16, h: int = 64, w: int = 64) -> np.ndarray:
    """A scrolling smooth gradient and a red square moving down: easy to code and to check."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i, ..., 0] = (x * 4 + i * 8) % 256
        out[i, ..., 1] = (y * 3) % 256
        out[i, ..., 2] = 128
        out[i, 4 + i : 4 + i + h // 4, w // 3 : w // 3 + w // 4] = (255, 40, 40)
    return out


def index_clip(t: int = 16, size: int = 32, step: int = 16) -> np.ndarray:
    """Frame i is flat grey i * step, so a decoded frame's mean says which source frame it is."""
    return np.repeat(np.arange(t, dtype=np.uint8)[:, None, None, None] * step, size, 1).repeat(
        size, 2).repeat(3, 3)


def frame_indices(video: np.ndarray, step: int = 16) -> list[int]:
    return [round(float(f.mean()) / step) for f in video]


def video_with_audio(frames: np.ndarray, fps: int = 8) -> bytes:
    """mp4 holding an mp2 silence track before the H.264 track, so 'first stream' is audio."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        audio = c.add_stream("mp2", rate=16000, layout="mono")
        video = c.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        samples, chunk = 16000 * len(frames) // fps, 1152
        for pts in range(0, samples, chunk):
            af = av.AudioFrame.from_ndarray(np.zeros((1, chunk), np.int16), format="s16",
                                            layout="mono")
            af.sample_rate, af.pts = 16000, pts
            c.mux(audio.encode(af))
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(video.encode(vf))
        c.mux(audio.encode(None))
        c.mux(video.encode(None))
    return buf.getvalue()


def audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        audio = c.add_stream("mp2", rate=16000, layout="mono")
        for i in range(10):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16",
                                            layout="mono")
            af.sample_rate, af.pts = 16000, i * 1152
            c.mux(audio.encode(af))
        c.mux(audio.encode(None))
    return buf.getvalue()


@pytest.fixture(autouse=True)
def never_hang() -> Iterator[None]:
    # A decoder stuck on malformed input would stall CI silently; fail the test instead.
    def fail(*_: object) -> None:
        raise TimeoutError("video test took more than 20 s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------- encode / decode


def test_round_trip_matches_frames() -> None:
    frames = moving_clip()
    data = encode_mp4(frames, fps=8.0, crf=18)
    decoded = decode_video(data)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    mae = np.abs(decoded.astype(np.int16) - frames).mean()
    assert mae <= ROUND_TRIP_MAE, mae


@pytest.mark.parametrize("codec, fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_decode_converts_colours_as_pyav_does_frame_by_frame(codec: str, fmt: str) -> None:
    # decode_video keeps one swscale context per clip; the bytes must be PyAV's own per-frame
    # conversion, and asking for the size the video already has must not resample anything.
    data = encode_video(moving_clip(t=6, h=48, w=64), 8.0, codec, fmt)
    with av.open(io.BytesIO(data)) as c:
        reference = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(decode_video(data), reference)
    assert np.array_equal(decode_video(data, size=(48, 64)), reference)
    # A frame repeated for several target times (fps resampling) is the same frame's bytes.
    assert np.array_equal(decode_video(data, fps=16)[::2], reference)


@pytest.mark.parametrize("h, w", [(64, 64), (32, 32), (96, 96), (64, 96)])
def test_encode_is_deterministic(h: int, w: int) -> None:
    # Other encodes and decodes in between: x264's AVX-512 code once made the bytes depend on
    # what the process had done before (sizes 32, 96 and 64x96 showed it).
    frames = moving_clip(h=h, w=w)
    first = encode_mp4(frames)
    for crf in (10, 30):
        decode_video(encode_mp4(moving_clip(h=48, w=80), crf=crf), size=33)
    assert encode_mp4(frames.copy()) == first


def test_odd_sizes_come_back_padded_to_even() -> None:
    frames = moving_clip(t=4, h=33, w=47)
    decoded = decode_video(encode_mp4(frames))
    assert decoded.shape == (4, 34, 48, 3)
    # Padding repeats the edge, and the original area still matches.
    assert np.abs(decoded[:, :33, :47].astype(np.int16) - frames).mean() <= ROUND_TRIP_MAE


def test_higher_crf_gives_smaller_file() -> None:
    frames = moving_clip()
    sizes = [len(encode_mp4(frames, crf=crf)) for crf in (10, 18, 28, 40)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((4, 8, 8, 3), np.float32), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), "(8, 8, 3)"),
        (np.zeros((4, 8, 8, 4), np.uint8), "(4, 8, 8, 4)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "(0, 8, 8, 3)"),
    ],
)
def test_encode_rejects_bad_frames(frames: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_mp4(frames)


def test_fps_resampling_picks_nearest_frames() -> None:
    data = encode_mp4(index_clip(), fps=8.0)
    assert frame_indices(decode_video(data)) == list(range(16))
    assert frame_indices(decode_video(data, fps=4)) == [0, 2, 4, 6, 8, 10, 12, 14]
    # Upsampling repeats each frame; the clip still spans the same 2 s.
    assert frame_indices(decode_video(data, fps=16)) == [i // 2 for i in range(32)]
    # 3 fps: targets 0, 1/3, 2/3, ... s land nearest to frames 0, 3, 5, 8, 11, 13.
    assert frame_indices(decode_video(data, fps=3)) == [0, 3, 5, 8, 11, 13]


def test_num_frames_and_start() -> None:
    data = encode_mp4(index_clip(), fps=8.0)
    assert frame_indices(decode_video(data, num_frames=5)) == [0, 1, 2, 3, 4]
    assert frame_indices(decode_video(data, start=0.5, num_frames=4)) == [4, 5, 6, 7]
    assert frame_indices(decode_video(data, start=0.5, fps=4)) == [4, 6, 8, 10, 12, 14]
    # A clip shorter than asked for returns what it has; the caller decides.
    assert len(decode_video(data, start=1.5, num_frames=100)) == 4
    with pytest.raises(VideoDecodeError, match="start=5.0"):
        decode_video(data, start=5.0)


@pytest.mark.parametrize("codec, fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_start_seeks_past_keyframes(codec: str, fmt: str) -> None:
    # A keyframe every 4 frames, so start really seeks; frames before `start` are dropped by pts
    # (1.3 s * 8 fps = 10.4, so the first frame at or after it is 11).
    data = encode_video(index_clip(), 8.0, codec, fmt, g=4)
    assert frame_indices(decode_video(data, start=1.3, num_frames=3)) == [11, 12, 13]
    assert frame_indices(decode_video(data, start=1.0, fps=4)) == [8, 10, 12, 14]


@pytest.mark.parametrize("h, w", [(40, 80), (80, 40)])
def test_size_covers_then_centre_crops(h: int, w: int) -> None:
    # Green centre square, red and blue in the outer quarters of the long side: a centre crop to
    # a square keeps only green.
    frames = np.zeros((3, h, w, 3), np.uint8)
    frames[..., 1] = 200
    long_axis = 2 if w > h else 1
    quarter = max(h, w) // 4
    index = [slice(None)] * 4
    index[long_axis] = slice(0, quarter)
    frames[tuple(index)] = (200, 0, 0)
    index[long_axis] = slice(-quarter, None)
    frames[tuple(index)] = (0, 0, 200)
    data = encode_mp4(frames)

    square = decode_video(data, size=20)
    assert square.shape == (3, 20, 20, 3)
    assert np.abs(square[..., 1].astype(int) - 200).mean() < 10
    assert square[..., 0].mean() < 10 and square[..., 2].mean() < 10
    assert decode_video(data, size=(16, 24)).shape == (3, 16, 24, 3)
    assert decode_video(data, size=(96, 30)).shape == (3, 96, 30, 3)  # upscale too


@pytest.mark.parametrize(
    "codec, fmt, options",
    [
        ("libvpx-vp9", "webm", {"crf": 30, "b": 0}),
        ("libx264", "matroska", {"crf": 18}),
        ("libx264", "mov", {"crf": 18}),
        ("mpeg4", "avi", {"b": "4M"}),
    ],
)
def test_other_containers_decode(codec: str, fmt: str, options: dict[str, object]) -> None:
    frames = moving_clip()
    data = encode_video(frames, 8.0, codec, fmt, **options)
    decoded = decode_video(data)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.int16) - frames).mean() <= 2 * ROUND_TRIP_MAE
    info = probe_video(data)
    assert (info.width, info.height, info.num_frames) == (64, 64, 16)
    assert info.fps == pytest.approx(8.0)


def test_audio_track_is_ignored() -> None:
    frames = index_clip()
    data = video_with_audio(frames)
    with av.open(io.BytesIO(data)) as c:
        assert [s.type for s in c.streams] == ["audio", "video"]
    assert frame_indices(decode_video(data)) == list(range(16))
    assert frame_indices(decode_video(data, start=1.0, fps=4)) == [8, 10, 12, 14]
    assert probe_video(data).num_frames == 16


def test_probe_video(tmp_path: Path) -> None:
    data = encode_mp4(moving_clip(t=12, h=48, w=80), fps=6.0)
    info = probe_video(data)
    assert info == VideoInfo(width=80, height=48, fps=6.0, num_frames=12, duration=2.0,
                             codec="h264")
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    assert probe_video(path) == info
    assert decode_video(str(path)).shape == (12, 48, 80, 3)


def test_max_decoded_frames_bounds_the_work() -> None:
    with pytest.raises(VideoDecodeError, match="max_decoded_frames=5"):
        decode_video(encode_mp4(index_clip()), max_decoded_frames=5)


def _truncated(codec: str, fmt: str) -> bytes:
    data = encode_video(moving_clip(), 8.0, codec, fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: b"", id="zero-bytes"),
        pytest.param(lambda: b"this is a caption, not a video\n" * 20, id="text"),
        pytest.param(lambda: np.random.default_rng(0).bytes(8192), id="random"),
        pytest.param(lambda: (d := encode_mp4(moving_clip()))[: len(d) // 2], id="half-mp4"),
        pytest.param(lambda: _truncated("libx264", "matroska"), id="half-mkv"),
        pytest.param(lambda: _truncated("libvpx-vp9", "webm"), id="half-webm"),
        pytest.param(lambda: _truncated("mpeg4", "avi"), id="half-avi"),
        pytest.param(audio_only, id="audio-only"),
        pytest.param(lambda: "/nonexistent/dir/clip.mp4", id="missing-path"),
    ],
)
def test_bad_input_raises_one_typed_error(make: object) -> None:
    data = make()  # type: ignore[operator]
    with pytest.raises(VideoDecodeError) as err:
        decode_video(data, source="shard-0/key-7")
    message = str(err.value)
    assert "\n" not in message and message.startswith("shard-0/key-7: ")
    assert isinstance(err.value, ValueError)


def test_bad_input_probe_and_default_source_name() -> None:
    for data in (b"", b"not a video", audio_only()):
        with pytest.raises(VideoDecodeError):
            probe_video(data)
    with pytest.raises(VideoDecodeError, match="/nonexistent/clip.mp4"):
        probe_video("/nonexistent/clip.mp4")


# ----------------------------------------------------------------------------------- previews


def test_gif_and_webp_previews() -> None:
    frames = moving_clip(t=6, h=24, w=40)
    for data, fmt in ((to_gif(frames, fps=8.0), "GIF"), (to_webp(frames, fps=8.0), "WEBP")):
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == fmt and im.size == (40, 24)
            assert im.n_frames == 6 and im.info.get("loop") == 0
            im.load()  # WebP fills in the frame duration on load
            # WebP keeps milliseconds; GIF rounds to centiseconds.
            assert im.info["duration"] == (125 if fmt == "WEBP" else 120)
    with Image.open(io.BytesIO(to_webp(frames))) as im:  # lossless: pixels survive
        assert np.array_equal(np.asarray(im.convert("RGB")), frames[0])
    with Image.open(io.BytesIO(to_webp(frames, lossless=False))) as im:
        assert im.n_frames == 6


def test_png_preview() -> None:
    frame = moving_clip(t=1, h=30, w=50)[0]
    with Image.open(io.BytesIO(to_png(frame))) as im:
        assert im.format == "PNG" and np.array_equal(np.asarray(im), frame)
    with pytest.raises(ValueError, match="shape"):
        to_png(moving_clip(t=2))


def test_contact_sheet_shape() -> None:
    videos = [moving_clip(t=16, h=32, w=48), moving_clip(t=3, h=64, w=64)]
    sheet = contact_sheet(videos, max_frames=8)
    gap = 2
    assert sheet.dtype == np.uint8
    assert sheet.shape == (gap + 2 * (32 + gap), gap + 8 * (48 + gap), 3)
    # The first row's first and last cells are the first and last frames.
    assert np.array_equal(sheet[gap : gap + 32, gap : gap + 48], videos[0][0])
    last = gap + 7 * (48 + gap)
    assert np.array_equal(sheet[gap : gap + 32, last : last + 48], videos[0][-1])

    labelled = contact_sheet(videos, max_frames=4, labels=["a red square", "second"])
    assert labelled.shape[1] == gap + 4 * (48 + gap)
    assert labelled.shape[0] > gap + 2 * (32 + gap)
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(videos, labels=["only one"])
