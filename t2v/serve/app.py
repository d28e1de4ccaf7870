"""`t2v serve`: the online API on Ray Serve, over render's model, sampler and writers.

Two deployments. `VideoAPI` is the FastAPI ingress (one replica, no model): it validates a
request as a prompt-file row, names the video by a hash of everything its bytes depend on (so an
identical request finds the stored or running one), bounds the queue (503 + Retry-After) and
drives each video from a background task that no client connection owns, so a client that
disconnects cancels nothing. `VideoRenderer` holds the package (render's `Renderer`: the same
loading, sampling, mp4/poster writing and manifest parts as `t2v render`) and autoscales between
MIN and MAX replicas on queued requests; whenever its sampler is free it takes the waiting
requests of one shape and step count (up to `max_batch_size`) into one sampler call. It streams
each request's denoising steps back to the ingress, then its manifest row.

State lives in the ingress's memory and in `out`: every accepted video is recorded in
OUT/api/pending/ID.json until it is finished, then in OUT/api/requests/ID.json (its final
state). A new ingress (a restart, a redeploy, a moved replica) requeues what was pending, serves
every video the manifest or the records hold, and keeps in memory only the newest `keep_videos`
finished ones: an older one is read back from its record when asked for.
"""

# No `from __future__ import annotations` here: Serve pickles the FastAPI routes to the ingress
# replica, where string annotations (`request: "Request"`) no longer resolve (/openapi.json and
# every route taking a Request failed with "not fully defined").
import asyncio
import contextvars
import logging
import os
import secrets
import signal
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from t2v import storage
from t2v.config import ServeConfig
from t2v.models.package import package_hash, read_meta
from t2v.render import manifest as mf
from t2v.render.pipeline import preflight, prompt_rules, resolve_settings
from t2v.render.prompts import PromptRules, RowInvalid
from t2v.render.rows import RenderJob
from t2v.runtime import check_output_uri, ensure_ray
from t2v.serve.api import (
    VIDEO_ID,
    VideoJob,
    VideoRequest,
    error_detail,
    make_sample,
    parse_request,
    retry_after,
)
from t2v.serve.page import page_html
from t2v.serve.renderer import VideoRenderer

log = logging.getLogger("t2v.serve")

APP_NAME = "t2v"
QUEUE_BATCHES = 4
"""Batches of requests one renderer replica takes at once (see `renderer_options`)."""
FIRST_GUESS_S = 10.0
"""Seconds a video takes, for Retry-After before any video has finished."""
PENDING_DIR, REQUESTS_DIR = "api/pending", "api/requests"
"""Under `out`: accepted videos not finished yet; finished videos' final records."""


def pending_uri(out: str, video_id: str) -> str:
    return storage.join(out, PENDING_DIR, f"{video_id}.json")


def record_uri(out: str, video_id: str) -> str:
    return storage.join(out, REQUESTS_DIR, f"{video_id}.json")


# ----------------------------------------------------------------------------- the API


api = FastAPI(title="t2v", version="1",
              description="Text to video on a t2v model package: POST a prompt, poll its "
                          "status, fetch the mp4. Requests are validated as prompt-file rows.")


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class VideoAPI:
    """The ingress: validation, ids, the queue bound, the state of every video, the files."""

    def __init__(self, renderer: DeploymentHandle, cfg: ServeConfig, job: RenderJob,
                 rules: PromptRules) -> None:
        self.renderer, self.cfg, self.job, self.rules = renderer, cfg, job, rules
        self.token = cfg.api_token or os.environ.get("T2V_API_TOKEN") or None
        self.jobs: dict[str, VideoJob] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        """Ids of the finished videos in `jobs`, oldest first (the table's pruning order)."""
        self.tasks: set[asyncio.Task] = set()
        self.stats: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self.batches: set[str] = set()
        self.seconds_per_video = FIRST_GUESS_S
        self.loaded: str | None = None
        """The package hash a renderer reported once it held the model."""
        ok, _ = mf.latest_rows(mf.read_manifest(cfg.out))
        videos = set(storage.list_prefix(storage.join(cfg.out, mf.VIDEOS_DIR), suffix=".mp4"))
        for vid, row in ok.items():  # what earlier servers made: served, not made again
            if VIDEO_ID.fullmatch(vid) and row.get("video") in videos:
                self._keep(VideoJob.from_row(row))
        self.requeue: list[VideoJob] = []
        """Videos an earlier ingress accepted and never finished: driven again by this one."""
        for uri in storage.list_prefix(storage.join(cfg.out, PENDING_DIR), suffix=".json"):
            job = VideoJob.from_record(storage.read_text(uri))
            if job.id not in self.jobs:  # (one the manifest holds finished after its record)
                job.status, job.step, job.attempts = "queued", 0, 0
                self.jobs[job.id] = job
            self.requeue.append(self.jobs[job.id])
        try:  # the replica's event loop runs this constructor: start them now
            asyncio.get_running_loop().call_soon(self._resume)
        except RuntimeError:  # (else the first request does)
            pass

    # -- helpers

    def _resume(self) -> None:
        """Drive the videos an earlier ingress left pending (those finished meanwhile only
        get their final record)."""
        jobs, self.requeue = self.requeue, []
        for job in jobs:
            self.stats["requeued"] += job.status == "queued"
            self._start(job)

    def _start(self, job: VideoJob) -> None:
        # A fresh context: the video's render belongs to no HTTP request, so a client that
        # goes away cancels nothing.
        task = asyncio.create_task(self._render(job), context=contextvars.Context())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _keep(self, job: VideoJob) -> None:
        """A finished video into the table; the oldest finished leave it beyond keep_videos."""
        self.jobs[job.id] = job
        self.finished[job.id] = None
        self.finished.move_to_end(job.id)
        while len(self.finished) > self.cfg.keep_videos:
            self.jobs.pop(self.finished.popitem(last=False)[0], None)

    def _stored(self, video_id: str) -> VideoJob | None:
        """A finished video no longer in memory, from its record in `out` (None: none)."""
        uri = record_uri(self.cfg.out, video_id)
        return VideoJob.from_record(storage.read_text(uri)) if storage.exists(uri) else None

    async def _lookup(self, video_id: str) -> VideoJob | None:
        job = self.jobs.get(video_id)
        if job is None and VIDEO_ID.fullmatch(video_id):
            job = await asyncio.to_thread(self._stored, video_id)
            if job is not None:
                self.stats["read_back"] += 1
                self._keep(job)
        return job

    def _record_final(self, job: VideoJob) -> None:
        storage.write_text(record_uri(self.cfg.out, job.id), job.record())
        storage.delete(pending_uri(self.cfg.out, job.id))

    def _auth(self, request: Request) -> None:
        if self.requeue:
            self._resume()
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPException(413, f"request body over {limit} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"request body over {limit} bytes")
        return body

    def _pending(self) -> int:
        return sum(j.status in ("queued", "running") for j in self.jobs.values())

    async def _job(self, video_id: str) -> VideoJob:
        job = await self._lookup(video_id)
        if job is None:
            raise HTTPException(404, f"no video {video_id[:40]!r}")
        return job

    async def _file(self, video_id: str, uri_of: Callable[[str, str], str],
                    media_type: str) -> Response:
        job = await self._job(video_id)
        if job.status != "done":
            raise HTTPException(409, f"video {video_id} is {job.status}")
        data = await asyncio.to_thread(storage.read_bytes, uri_of(self.cfg.out, job.id))
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})

    async def _render(self, job: VideoJob) -> None:
        """Drive one video to done or failed; a dead renderer replica is retried."""
        try:
            if job.status in ("queued", "running"):
                await self._attempts(job)
        finally:
            if job.status in ("queued", "running"):  # cancelled, or a bug here: say so
                job.fail("the server stopped driving this video")
        try:
            await asyncio.to_thread(self._record_final, job)
        except Exception as e:  # noqa: BLE001 - the video is made; only its record is missing
            log.warning("video %s: final record not written: %s", job.id, e)
        self._keep(job)

    async def _attempts(self, job: VideoJob) -> None:
        while True:
            job.attempts += 1
            try:
                stream = self.renderer.options(stream=True).render.remote(
                    job.sample.model_dump_json())
                async for event in stream:
                    if "row" in event:
                        self._finished(job, event)
                    elif "step" in event:
                        job.progress(event["step"], event["steps"])
                if job.status not in ("done", "failed"):
                    job.fail("the renderer ended without a result")
                return
            except (RayActorError, ActorUnavailableError) as e:
                if job.status in ("done", "failed"):  # lost after its result: nothing to redo
                    return
                if job.attempts > self.cfg.retries:
                    job.fail(f"renderer lost {job.attempts} times: {type(e).__name__}")
                    return
                job.status, job.step = "queued", 0
                self.stats["retried"] += 1
            except Exception as e:  # noqa: BLE001 - the video fails, with its reason
                job.fail(_reason(e))
                log.warning("video %s failed: %s", job.id, job.error)
                return

    def _finished(self, job: VideoJob, event: dict) -> None:
        job.done(event["row"])
        if event["batch"] not in self.batches:  # one manifest part per sampler call
            self.batches.add(event["batch"])
            self.stats["sampler_calls"] += 1
            self.batch_sizes[event["batch_size"]] += 1
        self.stats["rendered" if job.status == "done" else "failed"] += 1
        wall = (job.finished or 0) - (job.started or job.created)
        self.seconds_per_video = 0.8 * self.seconds_per_video + 0.2 * wall

    # -- routes

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once a renderer has loaded the model (asked until then, not behind busy
        renderers afterwards: replica health is Serve's to watch)."""
        if self.loaded is None:
            try:
                self.loaded = await asyncio.wait_for(self.renderer.ready.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - not ready yet, or no replica
                return JSONResponse({"status": "starting", "error": type(e).__name__}, 503)
        return JSONResponse({"status": "ok", "model": self.job.model,
                             "package_hash": self.loaded})

    @api.post("/v1/videos", status_code=202, openapi_extra={"requestBody": {
        "required": True,
        "content": {"application/json": {"schema": VideoRequest.model_json_schema()}}}})
    async def create(self, request: Request) -> JSONResponse:
        """Ask for a video: 202 + its id (200 when the same video is already stored)."""
        self._auth(request)
        try:
            settings = parse_request(await self._body(request), self.rules)
        except RowInvalid as e:
            return JSONResponse({"detail": error_detail(e)}, 422)
        sample = make_sample(settings, self.job)
        known = await self._lookup(sample.id)
        if known is not None and known.status != "failed":
            self.stats["deduplicated"] += 1
            return JSONResponse(known.view() | {"deduplicated": True},
                                200 if known.status == "done" else 202)
        pending = self._pending()
        if pending >= self.cfg.max_queue:
            self.stats["refused"] += 1
            wait = retry_after(pending, self.cfg.replicas[1], self.seconds_per_video)
            return JSONResponse({"detail": f"queue full ({pending} videos pending); retry in "
                                           f"{wait} s"}, 503, headers={"Retry-After": str(wait)})
        job = self.jobs[sample.id] = VideoJob(sample)
        self.finished.pop(job.id, None)  # (a failed one asked for again)
        try:  # recorded before it is accepted: a restarted ingress finds and finishes it
            await asyncio.to_thread(storage.write_text, pending_uri(self.cfg.out, job.id),
                                    job.record())
        except Exception as e:  # noqa: BLE001 - not accepted: the client may try again
            del self.jobs[job.id]
            return JSONResponse({"detail": f"cannot record the request: {_reason(e)}"}, 503,
                                headers={"Retry-After": "5"})
        self._start(job)
        return JSONResponse(job.view() | {"deduplicated": False}, 202,
                            headers={"Location": f"/v1/videos/{job.id}"})

    @api.get("/v1/videos")
    async def recent(self, request: Request, limit: int = 24) -> JSONResponse:
        """The most recent videos, newest first."""
        self._auth(request)
        jobs = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
        return JSONResponse({"videos": [j.view() for j in jobs[:max(0, min(limit, 200))]]})

    @api.get("/v1/videos/{video_id}.mp4")
    async def video(self, video_id: str, request: Request) -> Response:
        self._auth(request)
        return await self._file(video_id, mf.video_uri, "video/mp4")

    @api.get("/v1/videos/{video_id}.png")
    async def poster(self, video_id: str, request: Request) -> Response:
        self._auth(request)
        return await self._file(video_id, mf.poster_uri, "image/png")

    @api.get("/v1/videos/{video_id}")
    async def status(self, video_id: str, request: Request) -> JSONResponse:
        """Status (queued, running, done, failed), progress in denoising steps, timings, URLs."""
        self._auth(request)
        return JSONResponse((await self._job(video_id)).view())

    @api.get("/v1/stats")
    async def counters(self, request: Request) -> JSONResponse:
        """The server's own counters: sampler calls and their batch sizes, refusals, ..."""
        self._auth(request)
        statuses = Counter(j.status for j in self.jobs.values())
        return JSONResponse({
            "sampler_calls": self.stats["sampler_calls"], "rendered": self.stats["rendered"],
            "failed": self.stats["failed"], "deduplicated": self.stats["deduplicated"],
            "refused": self.stats["refused"], "retried": self.stats["retried"],
            "requeued": self.stats["requeued"], "read_back": self.stats["read_back"],
            "in_memory": len(self.jobs),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "statuses": dict(statuses), "pending": self._pending(),
            "max_queue": self.cfg.max_queue,
            "seconds_per_video": round(self.seconds_per_video, 3)})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(page_html(self.job.model, self.token is not None))


def _reason(e: BaseException) -> str:
    """One line: the exception the renderer raised (inside Ray's task error), its message."""
    e = getattr(e, "cause", None) or e
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- building


def build_app(cfg: ServeConfig) -> serve.Application:
    """The two deployments, bound to a package and an output location; every whole-server
    check first (missing model, bad defaults, output not writable: one line each)."""
    for name in ("model", "out"):
        if not getattr(cfg, name):
            raise ValueError(f"serve needs {name}=URI (--{name})")
    check_output_uri(cfg.out)
    check_autoscaling(cfg)
    meta = read_meta(cfg.model)
    render = resolve_settings(cfg.render.model_copy(update={"model": cfg.model, "out": cfg.out,
                                                            "prompts": "api"}), meta)
    rules = prompt_rules(render, meta)
    preflight(cfg.out)
    job = RenderJob(model=cfg.model, package_hash=package_hash(cfg.model), sampler=render.sampler,
                    shift=render.shift, fps=render.fps, crf=render.crf, run="api", source="api")
    # The token is read here, where `t2v serve` runs, so that it also holds on a cluster whose
    # replicas never saw this environment (the ingress also reads its own, for `serve deploy`).
    cfg = cfg.model_copy(update={"api_token": cfg.api_token or os.environ.get("T2V_API_TOKEN")
                                 or None})
    renderer = VideoRenderer.options(**renderer_options(cfg)).bind(
        render, job, cfg.max_batch_size, cfg.batch_wait_s)
    return VideoAPI.bind(renderer, cfg, job, rules)


def check_autoscaling(cfg: ServeConfig) -> None:
    """Serve's own validation of the generated autoscaling config, as one line, before any
    deployment starts (`autoscaling.` keys are passed through)."""
    from ray.serve.config import AutoscalingConfig  # noqa: PLC0415 - Serve's own schema

    scaling = renderer_options(cfg).get("autoscaling_config")
    if scaling is None:
        return
    unknown = sorted(set(cfg.autoscaling) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"autoscaling: unknown key {unknown[0]!r} (Serve's AutoscalingConfig "
                         f"takes e.g. upscale_delay_s, downscale_delay_s, metrics_interval_s)")
    try:
        AutoscalingConfig(**scaling)
    except (TypeError, ValueError) as e:  # (pydantic's ValidationError is a ValueError)
        first = str(e).splitlines()
        raise ValueError(f"autoscaling: {' '.join(first[1:3]) if len(first) > 2 else first[0]}"
                         ) from None


def renderer_options(cfg: ServeConfig) -> dict:
    """Serve options of the renderer deployment: a fixed count, or autoscaling between MIN and
    MAX replicas on requests queued or running per replica (`target_queue`).

    A replica holds up to QUEUE_BATCHES batches of requests (the running one and those that
    wait in it for the sampler); beyond that they wait in the ingress's handle for a replica
    with room. Both count for autoscaling (Serve's ongoing requests include handle queues)."""
    lo, hi = cfg.replicas
    scaling = ({"num_replicas": lo} if lo == hi else {"autoscaling_config": {
        "min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": cfg.target_queue,
        **cfg.autoscaling}})
    return {"max_ongoing_requests": QUEUE_BATCHES * cfg.max_batch_size, **scaling,
            "ray_actor_options": {"num_cpus": cfg.cpus_per_replica,
                                  "num_gpus": cfg.gpus_per_replica}}


def app_builder(args: dict) -> serve.Application:
    """For a Serve config file (`serve deploy`, KubeRay RayService): `import_path:
    t2v.serve.app:app_builder`, `args:` the ServeConfig keys."""
    return build_app(ServeConfig.model_validate(args))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_serve_command(cfg: ServeConfig) -> dict:
    """`t2v serve`: build the app (checks first), join or start Ray, start Serve's HTTP proxy on
    host:port, deploy; then stay in the foreground (blocking) until interrupted."""
    app = build_app(cfg)
    ensure_ray(cfg.address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"[serve] {cfg.model} at {url} (API docs {url}/docs); videos to {cfg.out}", flush=True)
    if cfg.blocking:
        # SIGTERM (`ray job stop`, Kubernetes, kill) ends it as Ctrl-C does: the application is
        # deleted and a Ray this process started goes with it.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("[serve] stopping", flush=True)
            serve.delete(APP_NAME)
    return {"url": url, "app": APP_NAME, "model": cfg.model, "out": cfg.out}
