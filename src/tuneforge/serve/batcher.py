"""Dynamic batching: requests wait in a bounded queue; one worker gathers up to
`max_batch` rows of them (waiting at most `max_wait_ms` after the first) and runs
them on a single model thread, grouped by served model (base or adapter).

A request with more rows than a micro-batch holds (many texts, or prompts x n)
is split: the rows left over are carried into the next micro-batches, after the
requests that arrived meanwhile, so that a big request does not hold the model
for its whole length. A cancelled request (timed out, or its client gone) is
dropped between micro-batches; generation also checks between decode steps.

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
    """One request: its rows (texts or generation rows). Its future gets the list
    of the rows' results, in order, once every row has been computed."""

    kind: str  # "classify" | "generate"
    model: str
    payload: list  # the rows
    future: asyncio.Future
    cancel_event: threading.Event = field(default_factory=threading.Event)
    taken: int = 0  # rows handed to micro-batches so far
    done: int = 0  # rows computed so far
    results: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.payload)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def live(self) -> bool:
        return not self.cancelled and not self.future.done()


@dataclass
class Piece:
    """A slice of one job's rows that goes into one micro-batch."""

    job: Job
    start: int
    payload: list


class Batcher:
    def __init__(self, run_group: Callable[[str, str, list[Piece]], list], max_batch: int, max_wait_ms: float,
                 max_queue: int, on_batch: Optional[Callable[[str, int], None]] = None):
        """`run_group(kind, model, pieces)` runs on the model thread and returns, per
        piece, the list of its rows' results, or an Exception that fails its job."""
        self.run_group = run_group
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.queue: Optional[asyncio.Queue] = None
        self.carry: list[Job] = []  # jobs split over micro-batches, with rows still to compute
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-model")
        self.task: Optional[asyncio.Task] = None

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
        return (self.queue.qsize() if self.queue else 0) + len(self.carry)

    def submit(self, kind: str, model: str, rows: list) -> Job:
        job = Job(kind, model, rows, asyncio.get_running_loop().create_future())
        job.results = [None] * len(rows)
        if not rows:  # nothing to compute: no micro-batch would ever resolve it
            job.future.set_result([])
            return job
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull() from None
        return job

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread between batches (adapter loads, removals)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def _arrivals(self) -> list[Job]:
        """Jobs from the queue for the next micro-batch. With nothing carried over,
        wait for the first and then up to max_wait for company; with a carried job
        to fill the batch, take only what is queued now."""
        loop = asyncio.get_running_loop()
        if self.carry:
            jobs, rows = [], 0
            while rows < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                rows += jobs[-1].size
            return jobs
        first = await self.queue.get()
        jobs, rows = [first], first.size
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0 and self.queue.empty():
                break
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(), remaining)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            jobs.append(job)
            rows += job.size
        return jobs

    async def _gather(self) -> list[Piece]:
        """The next micro-batch: new arrivals first (a small request does not wait
        behind a big one's remaining rows), then the carried jobs, oldest first."""
        arrivals = await self._arrivals()
        pieces, room = [], self.max_batch
        for job in arrivals + self.carry:
            if not job.live or room == 0:
                continue
            take = min(room, job.size - job.taken)
            pieces.append(Piece(job, job.taken, job.payload[job.taken:job.taken + take]))
            job.taken += take
            room -= take
        self.carry = [j for j in self.carry + arrivals if j.live and j.taken < j.size]
        return pieces

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[tuple[str, str], list[Piece]] = {}
            for piece in await self._gather():
                groups.setdefault((piece.job.kind, piece.job.model), []).append(piece)
            for (kind, model), pieces in groups.items():
                pieces = [p for p in pieces if p.job.live]  # cancelled while an earlier group ran
                if not pieces:
                    continue
                if self.on_batch:
                    self.on_batch(kind, sum(len(p.payload) for p in pieces))
                try:
                    results = await loop.run_in_executor(self.pool, self.run_group, kind, model, pieces)
                except Exception as exc:  # a failed batch fails its requests, not the server
                    results = [exc] * len(pieces)
                # Futures belong to the event loop: resolved here, not on the model thread.
                for piece, result in zip(pieces, results):
                    self._resolve(piece, result)

    @staticmethod
    def _resolve(piece: Piece, result) -> None:
        job = piece.job
        if job.future.done():
            return
        if isinstance(result, Exception):
            job.cancel()  # its carried rows are dropped
            job.future.set_exception(result)
            return
        job.results[piece.start:piece.start + len(piece.payload)] = result
        job.done += len(piece.payload)
        if job.done == job.size:
            job.future.set_result(job.results)
