"""The generation worker: model work runs off the event loop.

fifo (`running=1`): one job at a time, in arrival order, on a single thread. batch: up to
`running` jobs at once, each on its own thread (retrieval and chunk K/V loads there), whose
generation the engine's scheduler batches (rag.engine.scheduler). Either way a bound on the
number waiting beyond those running turns overload into a quick 503 instead of an
ever-growing wait.
A job that is still queued when its client leaves is dropped before it starts;
a running one is told to stop through its `Cancel` (checked at every token).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """More jobs are waiting than the worker accepts."""


@dataclass
class Cancel:
    """Set when the client went away; generation polls it through `on_text`."""

    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    def __bool__(self) -> bool:
        return self.event.is_set()


@dataclass
class Job:
    """What a streamed job sends back: text deltas, then its result (or error)."""

    result: Any = None
    error: BaseException | None = None
    queued_ms: float = 0.0


_DONE = object()


class GenerationWorker:
    def __init__(self, max_queue: int = 32, running: int | None = None):
        # fifo counts the running job in the bound (as it always has); batch adds its rows.
        self.max_queue = max_queue + (running or 0)
        threads = 1 if running is None else running + max_queue
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kvrag-gen")
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._running = 0

    @property
    def busy(self) -> bool:
        """A job is running."""
        return self._running > 0

    @property
    def depth(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def _admit(self) -> None:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests already queued")
            self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _wrap(self, fn: Callable[[], T], cancel: Cancel | None, job: Job) -> Callable[[], T | None]:
        t0 = time.perf_counter()

        def run() -> T | None:
            job.queued_ms = 1000 * (time.perf_counter() - t0)
            try:
                if cancel:  # the client left while this waited
                    return None
                with self._lock:
                    self._running += 1
                try:
                    return fn()
                finally:
                    with self._lock:
                        self._running -= 1
            finally:
                self._release()

        return run

    async def call(
        self, fn: Callable[[], T], cancel: Cancel | None = None, job: Job | None = None
    ) -> T:
        """Run fn on the worker and await its result; cancelling the await drops a queued job."""
        self._admit()
        job = job or Job()
        future = self._executor.submit(self._wrap(fn, cancel, job))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel() and cancel is not None:
                cancel.set()  # already running: stop at the next token
            elif future.cancelled():
                self._release()
            raise

    def stream(
        self, fn: Callable[[Callable[[str], bool], Cancel], T], cancel: Cancel, job: Job
    ) -> AsyncIterator[str]:
        """Queue fn(on_text, cancel) now (QueueFull raises here, before any response is
        sent) and return an iterator over its text deltas.

        When the iterator ends, `job.result` (or `job.error`) is set. If the consumer
        stops iterating (client gone), `cancel` is set so the worker frees up.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def on_text(delta: str) -> bool:
            if cancel:
                return False
            loop.call_soon_threadsafe(queue.put_nowait, delta)
            return True

        self._admit()
        future = self._executor.submit(self._wrap(lambda: fn(on_text, cancel), cancel, job))
        # Also fires for a job dropped unstarted; queued after every delta already posted.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _DONE))

        async def deltas() -> AsyncIterator[str]:
            try:
                while (item := await queue.get()) is not _DONE:
                    yield item  # type: ignore[misc]
                try:
                    job.result = await asyncio.wrap_future(future)
                except Exception as e:  # the caller reports it as an error event
                    job.error = e
            finally:
                if not future.done():
                    cancel.set()
                    if future.cancel():
                        self._release()

        return deltas()

    def post(self, fn: Callable[[], object]) -> None:
        """Fire-and-forget housekeeping on the worker thread (not counted in the queue bound)."""
        self._executor.submit(fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
