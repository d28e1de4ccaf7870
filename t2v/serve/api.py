"""The online API's own pieces, without Ray: a request body -> a render sample (by the rules of
a prompt-file row), the server's video ids, the state of one video and how it is shown.

Pure: pydantic only. The Serve deployments that use them are t2v/serve/app.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, create_model

from t2v.render.prompts import PromptRules, RowInvalid, TokenCounter, parse_row
from t2v.render.rows import RenderJob, RowFields, Sample, VideoSettings

VIDEO_ID = re.compile(r"v[0-9a-f]{24}")
"""Ids the server makes (`video_id`); nothing a client sends becomes part of a path."""
REFUSED_FIELDS = {"id": "ids are made by the server", "meta": "not taken by the API"}
"""Prompt-row fields a request may not give; it may give every other one."""
Status = Literal["queued", "running", "done", "failed"]

VideoRequest = create_model(
    "VideoRequest", __config__=ConfigDict(extra="forbid"),
    __doc__="The body of `POST /v1/videos`: the prompt-row fields but id and meta (for the "
            "OpenAPI schema; the body is validated by `parse_request` exactly as a prompt-file "
            "row: a field left out takes the server's default, a missing seed is derived from "
            "the other fields).",
    **{k: (f.annotation, f) for k, f in RowFields.model_fields.items()
       if k not in REFUSED_FIELDS})


def parse_request(body: bytes, rules: PromptRules,
                  count_tokens: TokenCounter | None = None) -> VideoSettings:
    """A request body -> the video's settings; RowInvalid names the field (None: the body)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowInvalid(f"invalid UTF-8 at byte {e.start + 1} of the body") from None
    row = parse_row(text, rules, count_tokens=count_tokens)
    for key, why in REFUSED_FIELDS.items():
        if key in json.loads(text):  # parse_row proved it is one bounded JSON object
            raise RowInvalid(f"{key}: {why}", key)
    return VideoSettings(**row.model_dump(include=set(VideoSettings.model_fields)))


def error_detail(e: RowInvalid) -> list[dict[str, Any]]:
    """A 422 body's `detail`, shaped as FastAPI's own: `loc` names the field."""
    return [{"loc": ["body", e.field] if e.field else ["body"], "msg": str(e),
             "type": "value_error"}]


def video_id(settings: VideoSettings, job: RenderJob) -> str:
    """`v` + 24 hex digits of sha256 over everything the video's bytes depend on: its settings
    and the package hash, sampler, shift, fps and crf. Identical requests get the same id, and
    so the stored result."""
    key = settings.model_dump(exclude={"meta"}) | job.model_dump(exclude={"model", "run",
                                                                          "source"})
    canon = json.dumps(key, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return "v" + hashlib.sha256(canon.encode()).hexdigest()[:24]


def make_sample(settings: VideoSettings, job: RenderJob) -> Sample:
    vid = video_id(settings, job)
    return Sample(**settings.model_dump(), id=vid, prompt_id=vid)


def retry_after(pending: int, replicas: int, seconds_per_video: float) -> int:
    """Seconds a refused client should wait: the queue's work spread over the replicas."""
    return max(1, min(600, math.ceil(pending * seconds_per_video / max(replicas, 1))))


@dataclass
class VideoJob:
    """One video the API was asked for, from the request to its stored result."""

    sample: Sample
    status: Status = "queued"
    step: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    row: dict | None = None
    """Its manifest row once done."""
    attempts: int = 0

    @property
    def id(self) -> str:
        return self.sample.id

    @classmethod
    def from_row(cls, row: dict) -> VideoJob:
        """A video an earlier server (or run) finished, from its manifest row."""
        sample = Sample.model_validate({k: row[k] for k in Sample.model_fields if k in row})
        return cls(sample, status="done", step=sample.steps, created=0.0, row=row)

    def record(self) -> str:
        """The video as JSON for `out` (requests/ID.json, api-pending/ID.json): enough to
        requeue it or to show it again after its state left the ingress's memory."""
        return json.dumps({"sample": self.sample.model_dump(), "status": self.status,
                           "step": self.step, "created": self.created, "started": self.started,
                           "finished": self.finished, "error": self.error, "row": self.row,
                           "attempts": self.attempts}, default=str)

    @classmethod
    def from_record(cls, text: str) -> VideoJob:
        d = json.loads(text)
        return cls(Sample.model_validate(d["sample"]), **{k: d[k] for k in (
            "status", "step", "created", "started", "finished", "error", "row", "attempts")})

    def progress(self, step: int, steps: int) -> None:
        if self.status == "queued":
            self.status, self.started = "running", time.time()
        self.step = min(step, steps)

    def done(self, row: dict) -> None:
        self.started = self.started or time.time()
        self.finished, self.row = time.time(), row
        if row.get("status") == "ok":
            self.status = "done"  # `step` stays what the renderer reported: its last step
        else:
            self.fail(row.get("error") or "render failed")

    def fail(self, error: str) -> None:
        self.status, self.error, self.finished = "failed", error, time.time()

    def view(self, prefix: str = "/v1/videos") -> dict[str, Any]:
        """What `GET /v1/videos/{id}` shows."""
        s = self.sample
        urls = {"self": f"{prefix}/{self.id}"}
        if self.status == "done":
            urls |= {"video": f"{prefix}/{self.id}.mp4", "poster": f"{prefix}/{self.id}.png"}
        timings = {"queued_s": _span(self.created, self.started),
                   "render_s": _span(self.started, self.finished),
                   "total_s": _span(self.created, self.finished)} if self.created else {}
        if self.row and self.row.get("seconds") is not None:
            timings["sampler_s"] = self.row["seconds"]  # this video's share of its batch
        return {"id": self.id, "status": self.status,
                "progress": {"step": self.step, "steps": s.steps,
                             "fraction": round(self.step / s.steps, 4)},
                "settings": s.model_dump(include=set(VideoRequest.model_fields)),
                "timings": timings, "urls": urls, "error": self.error,
                "stored": {"video": self.row.get("video"), "poster": self.row.get("poster")}
                if self.row and self.status == "done" else None}


def _span(start: float | None, end: float | None) -> float | None:
    if not start:
        return None
    return round((end or time.time()) - start, 3)
