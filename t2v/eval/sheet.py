"""The eval contact sheet: a row per prompt, frames over time, the caption and pass/fail marks."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS, FAIL, TEXT, BG = (90, 220, 110), (240, 80, 80), (230, 230, 230), (28, 28, 28)


def _cell(frame: np.ndarray, side: int) -> Image.Image:
    """A frame scaled (nearest: keep the pixels honest) so its longer side is `side`."""
    h, w = frame.shape[:2]
    k = side / max(h, w)
    return Image.fromarray(frame).resize((max(1, round(w * k)), max(1, round(h * k))),
                                         Image.NEAREST)


def eval_sheet(videos: list[np.ndarray | None], captions: list[str],
               verdicts: list[dict[str, dict]], max_frames: int = 8, cell: int = 64,
               gap: int = 3, text_width: int = 300) -> np.ndarray:
    """uint8 (H, W, 3) sheet. verdicts[i] = scoring.judge() output for video i (None video:
    a missing render, drawn as an empty row marked "missing")."""
    if not (len(videos) == len(captions) == len(verdicts)) or not videos:
        raise ValueError(f"need equal, non-empty lists, got {len(videos)} videos, "
                         f"{len(captions)} captions, {len(verdicts)} verdicts")
    font = ImageFont.load_default()
    _, top, _, bottom = font.getbbox("Ag")
    line_h = bottom - top + 3
    row_h = max(cell, 3 * line_h) + gap
    width = gap + max_frames * (cell + gap) + text_width
    sheet = Image.new("RGB", (width, gap + len(videos) * row_h), BG)
    draw = ImageDraw.Draw(sheet)
    for r, (video, caption, verdict) in enumerate(zip(videos, captions, verdicts, strict=True)):
        y = gap + r * row_h
        if video is not None:
            n = min(max_frames, video.shape[0])
            for c, idx in enumerate(np.linspace(0, video.shape[0] - 1, n).round().astype(int)):
                sheet.paste(_cell(video[idx], cell), (gap + c * (cell + gap), y))
        x = gap + max_frames * (cell + gap) + 4
        draw.text((x, y), caption[:48], fill=TEXT, font=font)
        if video is None:
            draw.text((x, y + line_h), "missing (no video rendered)", fill=FAIL, font=font)
            continue
        cx = x
        for attr, v in verdict.items():
            ok = bool(v["pass"])
            label = f"{attr} ok" if ok else f"{attr}: {v['pred']}"
            draw.text((cx, y + line_h), label, fill=PASS if ok else FAIL, font=font)
            cx += int(draw.textlength(label, font=font)) + 10
    return np.asarray(sheet)
