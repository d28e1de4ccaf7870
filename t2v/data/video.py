"""Video decode/encode through PyAV, and still/animated previews through PIL.

No Ray, no torch (Ray Data's read tasks decode with it in fresh processes). Frames are always
uint8 arrays shaped (T, H, W, 3), RGB; the one place that turns them into the models' float
(3, T, H, W) in [-1, 1] and back is `to_model_range` / `to_uint8` in t2v/data/tensors.py.

Decoding raises exactly one error type, `VideoDecodeError`, for anything that is not a readable
video (empty, text, random or truncated bytes, audio-only files, missing paths), so callers can turn
a bad sample into a counted skip or a manifest error row with a single `except`.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageDraw, ImageFont

VideoSource = bytes | bytearray | memoryview | str | os.PathLike[str]

# Errors PyAV raises for unreadable input. av's own errors subclass ValueError/OSError; EOFError
# and IndexError come from demuxers that run off the end of a truncated buffer.
_AV_ERRORS: tuple[type[BaseException], ...] = (av.FFmpegError, OSError, EOFError, ValueError,
                                               IndexError, RuntimeError)


def _why(e: BaseException) -> str:
    # FFmpegError's str() ends with the file name ('<none>' for in-memory input); we add our own.
    if isinstance(e, av.FFmpegError) and e.strerror:
        return str(e.strerror)
    return str(e) or type(e).__name__


class VideoDecodeError(ValueError):
    """The input is not a decodable video: corrupt, truncated, empty, or has no video frames."""

    def __init__(self, reason: str, source: str | None = None) -> None:
        reason = " ".join(str(reason).split())  # one line, whatever FFmpeg put in the message
        super().__init__(f"{source}: {reason}" if source else reason)
        self.source = source


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int  # from the container header, else estimated from duration or packet count
    duration: float  # seconds
    codec: str


# ----------------------------------------------------------------------------------- encoding


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        dtype = getattr(frames, "dtype", type(frames).__name__)
        raise ValueError(f"frames must be a uint8 numpy array (T, H, W, 3), got dtype {dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T, H, W >= 1, "
                         f"got {tuple(frames.shape)}")
    return frames


def _check_fps(fps: float) -> Fraction:
    if not (isinstance(fps, (int, float, np.integer, np.floating)) and math.isfinite(fps)
            and fps > 0):
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    # 1001 keeps NTSC rates exact (29.97 -> 30000/1001) and stays a valid codec time base.
    return Fraction(float(fps)).limit_denominator(1001)


_X264_CPU_CAP = "asm=avx2,fma3,bmi2,lzcnt"


@functools.cache
def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:  # Linux only; elsewhere no cap (see encode_video)
            return "avx512" in f.read()
    except OSError:
        return False


def encode_video(frames: np.ndarray, fps: float = 8.0, codec: str = "libx264",
                 container_format: str = "mp4", *, pix_fmt: str = "yuv420p",
                 container_options: dict[str, str] | None = None,
                 **codec_options: str | int | float) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB frames to a video file held in memory.

    `codec_options` go to the encoder as FFmpeg private options (`crf=18`, `preset="fast"`,
    `b="2M"`, ...). Odd heights/widths are padded to even by repeating the last row/column,
    because 4:2:0 chroma needs even sizes: a decoder returns the padded size.
    """
    frames = _check_frames(frames)
    rate = _check_fps(fps)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    buf = io.BytesIO()
    try:
        with av.open(buf, mode="w", format=container_format,
                     options=dict(container_options or {})) as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = pix_fmt
            # One encoder thread: x264 output depends on the thread count, and machines differ
            # in cores, so a fixed count is what makes the same frames give the same bytes.
            stream.codec_context.thread_count = 1
            options = {k: str(v) for k, v in codec_options.items()}
            if stream.codec_context.name == "libx264" and _avx512():
                # x264's AVX-512 macroblock-tree code reads memory it never wrote: on an AVX-512
                # Xeon the same frames gave up to 6 different files within one process. Lower
                # SIMD levels give bit-identical output, so cap x264 at AVX2 on such CPUs.
                params = options.get("x264-params", "")
                if "asm=" not in params:
                    options["x264-params"] = ":".join(filter(None, [params, _X264_CPU_CAP]))
            stream.options = options
            for i, frame in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                vf.pts = i  # in units of 1/rate, the codec time base
                container.mux(stream.encode(vf))
            container.mux(stream.encode(None))  # flush delayed (B-)frames
    except av.FFmpegError as e:
        raise ValueError(f"encoding with {codec} into {container_format} failed: {_why(e)}") from e
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18, preset: str = "medium",
               codec: str = "libx264") -> bytes:
    """H.264 yuv420p in mp4, deterministic for the same frames and settings.

    Odd sizes come back from `decode_video` padded to even (edge replication). The moov index is
    at the end of the file (no faststart): FFmpeg's faststart pass needs to re-read its output,
    which an in-memory writer cannot do.
    """
    return encode_video(frames, fps, codec, "mp4", crf=int(crf), preset=preset)


# ----------------------------------------------------------------------------------- decoding


@contextmanager
def _opened(data: VideoSource, source: str | None) -> Iterator[tuple[Any, Any, str | None]]:
    """Yield (container, first video stream, source name); turn every PyAV failure, at open or
    later while demuxing/decoding, into VideoDecodeError."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise VideoDecodeError("empty input (0 bytes)", source)
        fileobj: Any = io.BytesIO(bytes(data))
    else:
        fileobj = os.fspath(data)
        source = source or fileobj
        if not os.path.isfile(fileobj):
            raise VideoDecodeError("no such file (or not a regular file)", source)
    try:
        container = av.open(fileobj, mode="r")
    except _AV_ERRORS as e:
        raise VideoDecodeError(f"not a readable video container: {_why(e)}", source) from e
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoDecodeError(f"no video stream (streams: {kinds})", source)
        stream = container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.width <= 0:
            raise VideoDecodeError("video stream has no decodable codec or size", source)
        try:
            yield container, stream, source
        except VideoDecodeError:
            raise
        except _AV_ERRORS as e:
            raise VideoDecodeError(f"corrupt video data: {_why(e)}", source) from e


def _stream_fps(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe_video(data: VideoSource, source: str | None = None) -> VideoInfo:
    """Read size, rate, length and codec from the container header without decoding pictures.

    Checks the header only: a file whose header is intact but whose data is cut off probes fine
    and fails in `decode_video`.
    """
    with _opened(data, source) as (container, stream, source):
        fps = _stream_fps(stream)
        duration = 0.0
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        num_frames = int(stream.frames or 0)
        if num_frames <= 0 and duration > 0 and fps > 0:
            num_frames = round(duration * fps)
        if num_frames <= 0:  # nothing in the header: count packets (demux only, cheap)
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        if duration <= 0 and fps > 0:
            duration = num_frames / fps
        ctx = stream.codec_context
        return VideoInfo(width=ctx.width, height=ctx.height, fps=fps, num_frames=num_frames,
                         duration=duration, codec=ctx.name)


def resize_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers (height, width) keeping its aspect, then centre-crop.

    One PIL call: the crop is given as a float source box, so the output is exactly the target
    size with no rounding drift. BOX (area averaging) when shrinking, which neither aliases nor
    rings; BICUBIC when enlarging.
    """
    w, h = image.size
    scale = max(height / h, width / w)
    bw, bh = width / scale, height / scale
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    return image.resize((width, height), resample, box=box)


def decode_video(data: VideoSource, *, fps: float | None = None, num_frames: int | None = None,
                 start: float = 0.0, size: tuple[int, int] | int | None = None,
                 source: str | None = None, max_decoded_frames: int = 100_000) -> np.ndarray:
    """Decode the first video stream to uint8 (T, H, W, 3) RGB; other streams are not demuxed.

    start: seconds from the stream start; frames stamped earlier (beyond 1 ms of rounding) are
        skipped. fps: resample by taking, for each target time start + k/fps, the source frame
        nearest to it (ties go to the earlier frame); None keeps every frame. num_frames: stop
        after this many output frames; a shorter clip returns what it has. size: (H, W) or an
        int for square, via `resize_cover`. Decoding more than `max_decoded_frames` frames is an
        error, so a huge or malformed file cannot run unbounded.
    """
    target_hw = (size, size) if isinstance(size, int) else size
    if target_hw is not None and (len(target_hw) != 2 or not all(
            isinstance(v, (int, np.integer)) and v > 0 for v in target_hw)):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if fps is not None:
        _check_fps(fps)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start must be >= 0 seconds, got {start!r}")

    with _opened(data, source) as (container, stream, source):
        native_fps = _stream_fps(stream) or 25.0  # only used when pts are missing
        time_base = stream.time_base or Fraction(1, 1)
        t0 = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
        seeked = False
        if start > 0:
            try:  # to the keyframe at or before `start`; the pts filter below does the rest
                container.seek(int((start + t0) / time_base), stream=stream, backward=True)
                seeked = True
            except av.FFmpegError:
                pass  # unseekable: decode from the beginning, the pts filter still applies

        out: list[np.ndarray] = []
        limit = num_frames or math.inf
        cache: list[Any] = [None, None]  # the last converted (frame, array)
        # One colour converter for the clip: `frame.to_ndarray(format=...)` builds a new
        # swscale context for every frame, which cost 0.3 ms a 64x64 frame, 4x the decoding.
        # Same conversion, same bytes.
        reformatter = VideoReformatter()

        def emit(frame: av.VideoFrame) -> None:
            if cache[0] is not frame:  # a frame repeated for several targets converts once
                rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
                if target_hw is not None and rgb.shape[:2] != tuple(target_hw):
                    rgb = np.asarray(resize_cover(Image.fromarray(rgb), *target_hw))
                cache[:] = [frame, rgb]
            out.append(cache[1])

        decoded, last_t, k = 0, -math.inf, 0  # k: index of the next target time when resampling
        prev: tuple[float, av.VideoFrame] | None = None  # resampling: the latest source frame
        for packet in container.demux(stream):
            for frame in packet.decode():
                decoded += 1
                if decoded > max_decoded_frames:
                    raise VideoDecodeError(f"more than max_decoded_frames={max_decoded_frames} "
                                           "frames; raise the limit for long videos", source)
                t = (float(frame.pts * time_base) - t0 if frame.pts is not None
                     else last_t + 1 / native_fps)
                last_t = t
                if t < start - 1e-3:
                    continue
                if fps is None:
                    emit(frame)
                else:
                    # Emit `prev` for every target time closer to it than to this frame.
                    while len(out) < limit and prev and start + k / fps <= (prev[0] + t) / 2:
                        emit(prev[1])
                        k += 1
                    while len(out) < limit and not prev and start + k / fps <= t:
                        emit(frame)  # the first kept frame is nearest to targets before it
                        k += 1
                    prev = (t, frame)
                if len(out) >= limit:
                    break
            if len(out) >= limit:
                break
        else:  # the whole stream was read
            # The last frame stays on screen for one frame period and covers targets up to then.
            while fps and prev and len(out) < limit and (
                    start + k / fps <= prev[0] + 0.5 / native_fps):
                emit(prev[1])
                k += 1
            _check_not_truncated(container, stream, source, decoded, last_t, native_fps, seeked)

    if not out:
        if decoded == 0:
            raise VideoDecodeError("no decodable video frames", source)
        raise VideoDecodeError(f"no frames at or after start={start}s "
                               f"(last frame at {last_t:.3f}s)", source)
    return np.stack(out)


def _check_not_truncated(container: Any, stream: Any, source: str | None, decoded: int,
                         last_t: float, native_fps: float, seeked: bool) -> None:
    """Raise if the header promised clearly more video than the data held.

    FFmpeg decodes a cut-off file up to the cut and stops quietly (mkv/webm keep their index at
    the front), so without this check a half-downloaded shard would train on half a clip. A few
    frames of slack absorb edit lists and rounding in the header.
    """
    expected = int(stream.frames or 0)
    if expected > 0 and not seeked and expected - decoded > max(2, 0.01 * expected):
        raise VideoDecodeError(f"truncated: decoded {decoded} of {expected} frames", source)
    # A container duration is only the video's duration when there is no other stream.
    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:
        duration = container.duration / av.time_base
    else:
        return
    end = last_t + 1 / native_fps
    if decoded > 0 and end < duration - max(3 / native_fps, 0.01 * duration):
        raise VideoDecodeError(f"truncated: video ends at {end:.3f}s, header says "
                               f"{duration:.3f}s", source)


# ----------------------------------------------------------------------------------- previews


def _frame_images(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(f) for f in _check_frames(frames)]


def to_gif(frames: np.ndarray, fps: float = 8.0) -> bytes:
    """Animated GIF that loops forever, 256 colours a frame.

    GIF delays are whole centiseconds, and browsers slow delays under 20 ms to 100 ms, so the
    delay is rounded to 10 ms and at least 20 ms (8 fps -> 120 ms). PIL merges identical
    consecutive frames into one longer frame, so a still clip becomes a single frame.
    """
    images = _frame_images(frames)
    delay_cs = max(2, round(100 / float(_check_fps(fps))))
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=10 * delay_cs, loop=0)
    return buf.getvalue()


def to_webp(frames: np.ndarray, fps: float = 8.0, lossless: bool = True) -> bytes:
    """Animated WebP that loops forever; lossless keeps exact pixels, else quality 80."""
    images = _frame_images(frames)
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:],
                   duration=round(1000 / float(_check_fps(fps))), loop=0, lossless=lossless,
                   quality=80)  # lossless: compression effort, not fidelity
    return buf.getvalue()


def to_png(frame: np.ndarray) -> bytes:
    """One (H, W, 3) uint8 frame as PNG (posters)."""
    if getattr(frame, "ndim", 0) != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"frame must be (H, W, 3) uint8, got shape {shape}")
    buf = io.BytesIO()
    _frame_images(frame[None])[0].save(buf, format="PNG")
    return buf.getvalue()


def contact_sheet(videos: list[np.ndarray], max_frames: int = 8,
                  labels: list[str] | None = None, gap: int = 2) -> np.ndarray:
    """One row per video, up to `max_frames` evenly spaced frames per row, on a grey grid.

    Cells take the first video's frame size (others are resized to cover it and centre-cropped).
    With `labels`, a strip under each row carries its label in PIL's default font.
    """
    if not videos or max_frames < 1:
        raise ValueError(f"need >= 1 video and max_frames >= 1, got {len(videos)}, {max_frames}")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"got {len(labels)} labels for {len(videos)} videos")
    videos = [_check_frames(v) for v in videos]
    ch, cw = videos[0].shape[1:3]
    cols = min(max_frames, max(v.shape[0] for v in videos))
    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Ag")
    strip = bottom - top + 2 * gap if labels is not None else 0
    row_h = ch + gap + strip
    sheet = Image.new("RGB", (gap + cols * (cw + gap), gap + len(videos) * row_h), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for r, video in enumerate(videos):
        n = min(cols, video.shape[0])
        for c, idx in enumerate(np.linspace(0, video.shape[0] - 1, n).round().astype(int)):
            image = Image.fromarray(video[idx])
            if image.size != (cw, ch):
                image = resize_cover(image, ch, cw)
            sheet.paste(image, (gap + c * (cw + gap), gap + r * row_h))
        if labels is not None:
            draw.text((gap, gap + r * row_h + ch + gap), labels[r], fill=(230, 230, 230),
                      font=font)
    return np.asarray(sheet)
