"""Dynamic batching across tasks: requests for any task are collected into one mixed-batch model pass.

A batch closes when it holds ``max_batch`` images or ``max_wait`` seconds after its first image, whichever is
first; while the model runs a batch (in its own thread, so the event loop keeps answering), the next one fills.
Admission is bounded: at most ``max_queue`` images may be admitted and not yet answered; beyond that
:meth:`DynamicBatcher.admit` says no and the server answers 503 instead of letting the queue grow.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import VistuneError
from ..multitask import MultiTask
from .metrics import ServerMetrics


class TaskGone(Exception):
    """The task of a queued image was unloaded before its batch ran."""


@dataclass
class Prediction:
    probabilities: torch.Tensor  # (K,) the task's class probabilities


@dataclass
class _Item:
    image: torch.Tensor
    task: str
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    def __init__(self, model: MultiTask, metrics: ServerMetrics, *, max_batch: int, max_wait: float,
                 max_queue: int):
        self.model, self.metrics = model, metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.pending = 0  # admitted images not yet answered
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="vistune-model")  # the model runs here only
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="vistune-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Answer what was admitted (bounded by ``timeout``), then stop the worker and the model thread."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def call(self, fn, *args):
        """Run ``fn`` in the model thread, between batches (hot load / unload)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- admission and submission ---------------------------------------------------------
    def admit(self, n: int) -> bool:
        if self.pending + n > self.max_queue:
            self.metrics.rejected.inc(n)
            return False
        self.pending += n
        self.metrics.queue_depth.set(self.pending)
        return True

    def release(self, n: int) -> None:
        """Give back admitted places of images that were never submitted (a request that failed first)."""
        self.pending -= n
        self.metrics.queue_depth.set(self.pending)

    async def predict(self, images: list[torch.Tensor], tasks: list[str]) -> list[Prediction]:
        """Queue admitted images (one task each) and wait for their predictions."""
        loop = asyncio.get_running_loop()
        items = [_Item(img, task, loop.create_future()) for img, task in zip(images, tasks)]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    # ---- the worker -----------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self.executor, self._forward, batch)
            except Exception as e:  # the whole pass failed: every image of it gets the error
                results = [e] * len(batch)
            for item, result in zip(batch, results):
                if item.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
            self.pending -= len(batch)
            self.metrics.queue_depth.set(self.pending)

    def _forward(self, batch: list[_Item]) -> list[Prediction | BaseException]:
        """One mixed-batch pass (model thread); images of tasks unloaded meanwhile get TaskGone."""
        live = [i for i, item in enumerate(batch) if item.task in self.model.tasks]
        results: list[Prediction | BaseException] = [TaskGone(item.task) for item in batch]
        if not live:
            return results
        start = time.perf_counter()
        try:
            out = self.model([batch[i].image for i in live], [batch[i].task for i in live])
        except VistuneError as e:
            return [e] * len(batch)
        probs = out.probabilities().cpu()
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.batches.observe(len(live))
        for row, i in enumerate(live):
            results[i] = Prediction(probs[row, :out.num_classes[row]])
            self.metrics.images.labels(batch[i].task).inc()
        return results
