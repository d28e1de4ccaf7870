"""The render manifest: part files of JSON rows, their deduplicated view, summary and gallery.

No Ray, no torch. `{out}/manifest/` holds part files `{run}-{part}.jsonl`, each written once and
atomically (S3 has no append): the driver writes `{run}-prompts.jsonl` (the prompt file's error
rows) and each renderer batch writes `{run}-b{index}.jsonl`. Run ids are UTC timestamps, so sorted
file names are chronological; a batch Ray retries rewrites its own part under the same name.

Reading dedupes: the latest ok row of an id wins (a rerun with --overwrite renders an id again),
and error rows come from one run only, the latest (each run re-validates the whole prompt file).
The summary and index.html are built from that view, so each id counts once.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from t2v import storage
from t2v.render.prompts import RowError
from t2v.render.rows import RenderJob, Sample

MANIFEST_DIR = "manifest"
VIDEOS_DIR = "videos"
POSTERS_DIR = "posters"
SUMMARY_NAME = "summary.json"
INDEX_NAME = "index.html"

class ManifestRow(BaseModel):
    """One manifest line: a video's settings, the job's, and the outcome (None where a value
    does not apply: an error row of an unparsable line has no seed)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    prompt_id: str | None = None
    sample: int | None = None
    line: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    shift: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    crf: int | None = None
    meta: dict[str, Any] | None = None
    model: str | None = None
    package_hash: str | None = None
    status: Literal["ok", "error"]
    error: str | None = None
    video: str | None = None
    poster: str | None = None
    seconds: float | None = None
    run: str | None = None
    source: str | None = None


ROW_FIELDS = tuple(ManifestRow.model_fields)
"""Every manifest row has exactly these keys, in this order."""


def new_run_id(now: float | None = None) -> str:
    """`20250101T120000123456Z-1a2b3c`: sorts by start time; the suffix keeps two drivers that
    start in the same microsecond apart."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(3)}"


def video_uri(out: str, sample_id: str) -> str:
    return storage.join(out, VIDEOS_DIR, f"{sample_id}.mp4")


def poster_uri(out: str, sample_id: str) -> str:
    return storage.join(out, POSTERS_DIR, f"{sample_id}.png")


def part_uri(out: str, run: str, part: str) -> str:
    return storage.join(out, MANIFEST_DIR, f"{run}-{part}.jsonl")


def make_row(job: RenderJob, sample: Sample, *, status: Literal["ok", "error"],
             error: str | None = None, video: str | None = None, poster: str | None = None,
             seconds: float | None = None) -> ManifestRow:
    """The manifest row of one video: its sample, the job's settings and the outcome."""
    return ManifestRow(**sample.model_dump(), **job.model_dump(), status=status, error=error,
                       video=video, poster=poster,
                       seconds=None if seconds is None else round(seconds, 3))


def prompt_error_row(job: RenderJob, err: RowError) -> ManifestRow:
    """The row of a prompt line that is not a valid row (no video, no sample settings)."""
    return ManifestRow(id=err.id, prompt_id=err.id, line=err.line, prompt=err.prompt,
                       **job.model_dump(), status="error", error=err.error)


def to_jsonl(rows: Iterable[ManifestRow | dict]) -> str:
    return "".join(json.dumps(r.model_dump() if isinstance(r, ManifestRow) else r,
                              ensure_ascii=False, sort_keys=False) + "\n" for r in rows)


def write_part(out: str, run: str, part: str, rows: list[ManifestRow]) -> str:
    uri = part_uri(out, run, part)
    storage.write_text(uri, to_jsonl(rows))
    return uri


def parse_part(text: str) -> list[dict]:
    """Rows of one part file; a line that is not a JSON object is ignored (parts are written
    atomically, so this is someone's hand edit, not a torn write)."""
    rows = []
    for line in text.split("\n"):  # not splitlines: U+2028, U+0085 ... inside a prompt
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "status" in row:
            rows.append(row)
    return rows


def read_manifest(out: str) -> list[dict]:
    """All rows of all part files, oldest run first (file name order, then line order)."""
    rows = []
    for uri in storage.list_prefix(storage.join(out, MANIFEST_DIR), suffix=".jsonl"):
        rows += parse_part(storage.read_text(uri))
    return rows


def latest_rows(rows: list[dict], run: str | None = None) -> tuple[dict[str, dict], list[dict]]:
    """(id -> its latest ok row, error rows of `run`, by default the latest run with rows).

    An error row is about a line (a repeated id names one that is ok elsewhere) or about one
    render of an id, so it is kept even when the id has an ok row from another line or run.
    """
    ok: dict[str, dict] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("id"):
            ok[row["id"]] = row
    runs = [r.get("run") or "" for r in rows]
    last = run if run is not None else max(runs, default="")
    errors = [r for r, run in zip(rows, runs, strict=True)
              if r.get("status") == "error" and run == last]
    errors.sort(key=lambda r: (r.get("line") or 0, r.get("sample") or 0))
    return ok, errors


def summarize(*, rendered: int, skipped: int, failed: int, wall_s: float, total_ok: int = 0,
              **extra: object) -> dict:
    """What one job did (rendered/skipped/failed this run) and where the output stands."""
    return {"rendered": rendered, "skipped": skipped, "failed": failed,
            "videos_per_s": round(rendered / max(wall_s, 1e-9), 4), "wall_s": round(wall_s, 2),
            "total_ok": total_ok, **extra}


def summary_line(summary: dict) -> str:
    return (f"[render] done: {summary['rendered']} rendered, {summary['skipped']} skipped, "
            f"{summary['failed']} failed | {summary['videos_per_s']:.3f} videos/s | "
            f"{summary['wall_s']:.1f} s wall | {summary['total_ok']} videos in the output")


# ----------------------------------------------------------------------------- gallery

_STYLE = """body{font-family:sans-serif;margin:1em;background:#fafafa}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:220px;background:#fff;padding:6px;border:1px solid #ddd}
figure img{width:100%;image-rendering:pixelated}
figcaption{font-size:12px;word-wrap:break-word}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def gallery_html(ok: dict[str, dict], errors: list[dict], title: str = "t2v render") -> str:
    """index.html: a poster per video (linking the video) with its prompt; then the error rows.

    Links are relative (`videos/ID.mp4`), so the page works from a folder and from a bucket's
    static website alike. Every user string is escaped.
    """
    figures = []
    for sample_id, row in sorted(ok.items(), key=lambda kv: (kv[1].get("line") or 0, kv[0])):
        name = quote(sample_id, safe="")
        caption = (f"<b>{_e(sample_id)}</b> · seed {_e(row.get('seed'))} · "
                   f"{_e(row.get('frames'))}x{_e(row.get('height'))}x{_e(row.get('width'))}"
                   f"<br>{_e(row.get('prompt'))}")
        figures.append(f'<figure><a href="{VIDEOS_DIR}/{name}.mp4">'
                       f'<img src="{POSTERS_DIR}/{name}.png" alt="{_e(row.get("prompt"))}"></a>'
                       f"<figcaption>{caption}</figcaption></figure>")
    error_rows = "".join(f"<tr><td>{_e(r.get('line'))}</td><td>{_e(r.get('id'))}</td>"
                         f"<td>{_e(r.get('prompt'))}</td><td>{_e(r.get('error'))}</td></tr>"
                         for r in errors)
    errors_html = (f"<h2>Errors ({len(errors)})</h2><table><tr><th>line</th><th>id</th>"
                   f"<th>prompt</th><th>error</th></tr>{error_rows}</table>" if errors else "")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>{len(ok)} videos, {len(errors)} errors</p>"
            f"<div class=\"grid\">{''.join(figures)}</div>{errors_html}</body></html>\n")


def write_outputs(out: str, summary: dict, title: str) -> tuple[dict[str, dict], list[dict]]:
    """Rebuild the deduplicated view (errors: this run's); write summary.json and index.html."""
    ok, errors = latest_rows(read_manifest(out), run=summary.get("run"))
    summary["total_ok"] = len(ok)
    storage.write_text(storage.join(out, SUMMARY_NAME), json.dumps(summary, indent=1))
    storage.write_text(storage.join(out, INDEX_NAME), gallery_html(ok, errors, title))
    return ok, errors
