"""Dynamic batching: one asyncio task owns the model and merges the images of concurrent
requests into shared forward passes (Batcher)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..model import ImageTokenizer
from .config import ServeConfig, ServeError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    kind: str  # "encode" (inputs: pixels (k, 3, R, R)) or "decode" (inputs: ids (k, N, C))
    inputs: torch.Tensor
    features: bool  # encode: return the CLIP features too
    future: asyncio.Future
    enqueued: float  # event-loop time

    @property
    def size(self) -> int:
        return len(self.inputs)


class Batcher:
    """One asyncio task owns the model: it gathers queued jobs into batches of at most
    `max_batch` images and runs each pass in a dedicated thread, so the event loop keeps
    accepting requests while the model works. Jobs larger than `max_batch` run in chunks.

    The worker waits for company (up to `max_wait_ms` after the oldest job queued) only while
    requests are on their way (`expecting()`: reading, decoding, preprocessing): a lone
    client pays no waiting time, concurrent clients share passes."""

    def __init__(self, tokenizer: ImageTokenizer, config: ServeConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.max_wait = config.max_wait_ms / 1000.0
        self.stats = {"encode_passes": 0, "decode_passes": 0, "images_encoded": 0, "images_decoded": 0,
                      "largest_batch": 0}
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._running: list[_Job] = []  # taken, waiting for their pass
        self._incoming = 0  # requests being read and prepared, about to submit
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def incoming(self) -> int:
        return self._incoming

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Mark a request that will submit a job soon (while it reads and prepares its inputs)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            if self._wake is not None:
                self._wake.set()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="libra-tok-model")
        self._task = asyncio.create_task(self._run(), name="libra-tok-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in [*self._running, *self._jobs]:
            if not job.future.done():
                job.future.set_exception(ServeError(503, "the server is shutting down"))
        self._jobs.clear()
        self._queued = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def encode(self, pixels: torch.Tensor, features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k, 3, R, R) pixels -> ids (k, N, C) int64 and, if asked, features (k, N, D) float16."""
        return await self._submit("encode", pixels, features)

    async def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(k, N, C) ids -> images (k, 3, R, R) in [-1, 1], on the CPU."""
        return await self._submit("decode", ids, False)

    async def _submit(self, kind: str, inputs: torch.Tensor, features: bool):
        if not self.alive:
            raise ServeError(503, "the model worker is not running (the server is starting or shutting down)")
        if self._queued + len(inputs) > self.config.max_queue:
            raise ServeError(503, f"server busy: {self._queued} images are queued (max_queue "
                                  f"{self.config.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        job = _Job(kind, inputs, features, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._queued += job.size
        self._wake.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            # Wait for company while some is on its way: until a full batch queues, no request
            # is being prepared any more, or the oldest job has waited max_wait.
            deadline = self._jobs[0].enqueued + self.max_wait
            while self._queued < self.config.max_batch and self._incoming > 0:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            self._running = self._take()
            try:
                for kind in ("encode", "decode"):
                    group = [job for job in self._running if job.kind == kind]
                    if group:
                        await self._execute(kind, group)
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep the worker alive
                log.exception("batch failed")
                for job in self._running:
                    if not job.future.done():
                        job.future.set_exception(ServeError(500, f"internal error: {type(exc).__name__}: {exc}"))
            self._running = []

    def _take(self) -> list[_Job]:
        """Oldest jobs first, up to max_batch images (a larger first job is taken alone);
        jobs whose client went away are dropped."""
        taken: list[_Job] = []
        images = 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # cancelled: the client disconnected
                self._jobs.popleft()
                self._queued -= job.size
                continue
            if taken and images + job.size > self.config.max_batch:
                break
            self._jobs.popleft()
            self._queued -= job.size
            taken.append(job)
            images += job.size
        return taken

    async def _execute(self, kind: str, group: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        features = any(job.features for job in group)
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward, kind,
                                                 [job.inputs for job in group], features)
        except Exception as exc:  # noqa: BLE001 - a failed pass fails its requests, never the worker
            if len(group) > 1:  # e.g. out of memory: one at a time may still succeed
                for job in group:
                    await self._execute(kind, [job])
                return
            log.exception("%s pass failed", kind)
            if not group[0].future.done():
                group[0].future.set_exception(ServeError(500, f"{kind} failed: {type(exc).__name__}: {exc}"))
            return
        start = 0
        for job in group:
            part = [None if out is None else out[start:start + job.size] for out in outputs]
            start += job.size
            if job.future.done():
                continue
            if kind == "encode":
                job.future.set_result((part[0], part[1] if job.features else None))
            else:
                job.future.set_result(part[0])

    def _forward(self, kind: str, parts: list[torch.Tensor], features: bool) -> tuple[torch.Tensor | None, ...]:
        """Runs in the model thread: chunks of max_batch, results back on the CPU."""
        tok, precision = self.tokenizer, self.config.precision
        inputs = torch.cat(parts)
        ids, feats, images = [], [], []
        for chunk in inputs.split(self.config.max_batch):
            if kind == "encode":
                out = tok.encode(chunk, precision=precision)
                ids.append(out.ids.cpu())
                if features:
                    feats.append(out.features.half().cpu())
            else:
                images.append(tok.decode(chunk, precision=precision).cpu())
            self.stats[f"{kind}_passes"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(chunk))
        if kind == "encode":
            self.stats["images_encoded"] += len(inputs)
            return torch.cat(ids), (torch.cat(feats) if features else None)
        self.stats["images_decoded"] += len(inputs)
        return (torch.cat(images),)


__all__ = ["Batcher"]
