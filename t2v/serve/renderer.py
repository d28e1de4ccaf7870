"""`VideoRenderer`: the Serve deployment that holds a model package and renders requests.

Render's own `Renderer` (package loading, sampler, mp4/poster writing, manifest parts, as in
`t2v render`), driven by one sampling loop per replica that batches the requests waiting when
the sampler is free. The ingress (t2v/serve/app.py) calls `render` and reads its stream.
"""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

from ray import serve

from t2v.config import RenderConfig
from t2v.render import manifest as mf
from t2v.render.pipeline import Renderer
from t2v.render.rows import RenderJob, Sample

PROGRESS_EVERY_S = 0.2
"""Least seconds between two progress messages of one batch (the last step always goes)."""


@serve.deployment
class VideoRenderer:
    """A replica holding one package: requests -> batches -> videos, posters, manifest parts.

    Batches are formed when the sampler is free, from every request waiting then (those of the
    first waiting request's shape and steps, up to `max_batch_size`, after `batch_wait_s` for
    companions when it is not full). Serve's `@serve.batch` forms them as requests arrive
    instead: behind a running batch, late arrivals were locked into batches of 1 (measured with
    a queue of 12 and max_batch_size 2), and the requests Serve's router holds back from a full
    replica arrive one by one, after its back-off.
    """

    def __init__(self, render: RenderConfig, job: RenderJob, max_batch_size: int,
                 batch_wait_s: float) -> None:
        # Each replica writes its manifest parts under its own run id: `{run}-b{index}` never
        # collides between replicas, and every row names the package hash that made it.
        self.renderer = Renderer(render, job.model_copy(update={"run": mf.new_run_id()}))
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.index = 0
        self.waiting: deque[tuple[Sample, asyncio.Queue, float]] = deque()
        """(sample, its caller's event queue, arrival time), in arrival order."""
        self.arrived: asyncio.Event | None = None  # made on the replica's event loop
        self.worker: asyncio.Task | None = None

    def ready(self) -> str:
        return self.renderer.job.package_hash

    async def render(self, sample: str) -> AsyncIterator[dict]:
        """One video (a `Sample` as JSON) -> a stream: {"step", "steps"} messages while its
        batch samples, then {"row", "batch", "batch_size"}."""
        if self.worker is None or self.worker.done():
            self.arrived = asyncio.Event()
            self.worker = asyncio.create_task(self._work())
        events: asyncio.Queue = asyncio.Queue()
        self.waiting.append((Sample.model_validate_json(sample), events, time.monotonic()))
        self.arrived.set()
        while True:
            event = await events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if "row" in event:
                return

    def _take(self) -> list[tuple[Sample, asyncio.Queue, float]]:
        """The first waiting request and those of its batch key behind it, in arrival order."""
        key = self.waiting[0][0].batch_key
        batch = [w for w in self.waiting if w[0].batch_key == key][:self.max_batch_size]
        self.waiting = deque(w for w in self.waiting if not any(w is b for b in batch))
        return batch

    async def _work(self) -> None:
        """The replica's one sampling loop."""
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            first, _, since = self.waiting[0]
            if sum(w[0].batch_key == first.batch_key for w in self.waiting) < self.max_batch_size:
                # Not full: give companions arriving together the rest of the window.
                await asyncio.sleep(max(0.0, self.batch_wait_s - (time.monotonic() - since)))
            batch = self._take()
            index, self.index = self.index, self.index + 1
            try:
                async for event in self._sample(index, [s for s, _, _ in batch]):
                    if isinstance(event, list):  # the last message: the batch's manifest rows
                        part = f"{self.renderer.job.run}-b{index:06d}"
                        for (_, events, _), row in zip(batch, event, strict=True):
                            events.put_nowait({"row": row.model_dump(), "batch": part,
                                               "batch_size": len(batch)})
                    else:
                        for _, events, _ in batch:
                            events.put_nowait(event)
            except Exception as e:  # noqa: BLE001 - this batch's requests fail; the loop goes on
                for _, events, _ in batch:
                    events.put_nowait(e)

    async def _sample(self, index: int, batch: list[Sample]) -> AsyncIterator:
        """{"step", "steps"} while `batch` samples in a worker thread, then its manifest rows."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        self.renderer.progress = lambda k, n: loop.call_soon_threadsafe(queue.put_nowait, (k, n))
        work = asyncio.ensure_future(asyncio.to_thread(self.renderer.render_samples, index, batch))
        shown = 0.0
        while not work.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            k, n = getter.result()
            if k == n or time.time() - shown >= PROGRESS_EVERY_S:
                shown = time.time()
                yield {"step": k, "steps": n}
        yield work.result()  # raises what the batch raised (a storage failure)
