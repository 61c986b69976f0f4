"""Dynamic batching: requests wait in a bounded queue; one worker gathers up to
`max_batch` of them (waiting at most `max_wait_ms` after the first) and runs
them on a single model thread, grouped by served model (base or adapter).

Torch releases the GIL, so the event loop keeps accepting and streaming while
the model computes. A full queue raises QueueFull (the app answers 429).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class QueueFull(Exception):
    pass


@dataclass
class Job:
    kind: str  # "classify" | "generate" | "admin"
    model: str
    payload: Any  # texts, rows, or a callable (admin)
    future: asyncio.Future
    size: int = 1  # rows this job adds to a batch
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class Batcher:
    def __init__(self, run_group: Callable[[str, str, list[Job]], list], max_batch: int, max_wait_ms: float,
                 max_queue: int, on_batch: Optional[Callable[[str, int], None]] = None):
        self.run_group = run_group
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queue: Optional[asyncio.Queue] = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-model")
        self.task: Optional[asyncio.Task] = None
        self.running = 0  # jobs being computed now

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    def depth(self) -> int:
        return self.queue.qsize() if self.queue else 0

    def submit(self, kind: str, model: str, payload: Any, size: int = 1) -> Job:
        job = Job(kind, model, payload, asyncio.get_running_loop().create_future(), size)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull() from None
        return job

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread between batches (adapter loads, removals)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def _gather(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        first = await self.queue.get()
        batch, rows = [first], first.size
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0 and self.queue.empty():
                break
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(job)
            rows += job.size
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._gather() if not j.cancelled and not j.future.done()]
            groups: dict[tuple[str, str], list[Job]] = {}
            for job in batch:
                groups.setdefault((job.kind, job.model), []).append(job)
            for (kind, model), jobs in groups.items():
                if self.on_batch:
                    self.on_batch(kind, sum(j.size for j in jobs))
                self.running = len(jobs)
                try:
                    results = await loop.run_in_executor(self.pool, self.run_group, kind, model, jobs)
                except Exception as exc:  # a failed batch fails its requests, not the server
                    results = [exc] * len(jobs)
                finally:
                    self.running = 0
                # Futures belong to the event loop: resolved here, not on the model thread.
                for job, result in zip(jobs, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
