"""The guard's async side: one worker thread owns the model for async callers.

Concurrent ``ascreen`` requests arriving within ``max_wait_ms`` are micro-batched into one batched
prefill; generations (``call`` jobs) run one at a time, in order. Every waiting caller always gets
an answer: a result, a typed error, or a :class:`~ohd_guard.errors.ScreeningError` for an
interruption on the worker. The thread holds only a weak reference to its :class:`GuardWorker`
between jobs, so a guard nobody uses any more is collected and its thread ends.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ohd_guard.errors import ScreeningError

log = logging.getLogger("ohd_guard.guard")


@dataclass
class Job:
    kind: Literal["screen", "call"]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    raw: Any = None
    t0: float = 0.0
    fn: Callable[[], Any] | None = None


class GuardWorker:
    """Queue and thread of one guard's async calls.

    Args:
        lock: the guard's lock, held for every job (sync callers share it).
        screen: ``screen(raws, t0s) -> [Screened]`` for a micro-batch (the screening stage).
        settle: ``settle(screened) -> Verdict``: publish and apply the error policy.
    """

    def __init__(self, lock: threading.RLock, screen: Callable[[list, list], list], settle: Callable[[Any], Any],
                 max_batch_size: int, max_wait_ms: float):
        self.lock, self.screen, self.settle = lock, screen, settle
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, kind: Literal["screen", "call"], raw: Any = None, fn: Callable[[], Any] | None = None,
               cancel: threading.Event | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = Job(kind, loop, loop.create_future(), raw=raw, t0=time.perf_counter(), fn=fn)
        if cancel is not None:  # the caller cancelled (or timed out): stop the work it started
            job.future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        self._ensure_thread()
        self._queue.put(job)
        return job.future

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=_worker_main, args=(weakref.ref(self), self._queue),
                                                name="ohd-guard-worker", daemon=True)  # fmt: skip
                self._thread.start()

    def close(self) -> None:
        """Stop the thread (it restarts on the next async call)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout=30)

    # -- on the worker thread -----------------------------------------------------------------------
    def _collect(self, first: Job, q: queue.Queue, held: deque) -> list[Job]:
        """Gather more screen jobs until the batch is full or ``max_wait_ms`` has passed."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_ms / 1e3
        while len(batch) < self.max_batch_size:
            try:
                nxt = q.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if nxt is not None and nxt.kind == "screen":
                batch.append(nxt)
            else:
                held.append(nxt)  # generation jobs and shutdown wait for this batch
                if nxt is None:
                    break
        return batch

    def _run_screen_jobs(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.future.cancelled()]
        if not jobs:
            return
        try:
            with self.lock:
                results = self.screen([j.raw for j in jobs], [j.t0 for j in jobs])
        except BaseException as e:  # e.g. a fetcher raising CancelledError: every waiting caller gets an answer
            for job in jobs:
                _deliver(job, None, interrupted(e))
            if not isinstance(e, Exception):
                raise
            return
        for job, s in zip(jobs, results):
            try:
                _deliver(job, self.settle(s), None)
            except BaseException as e:
                _deliver(job, None, e)

    def _run_call_job(self, job: Job) -> None:
        if job.future.cancelled():
            return
        try:
            with self.lock:
                result = job.fn()  # type: ignore[misc]
        except BaseException as e:
            _deliver(job, None, interrupted(e))
            if not isinstance(e, Exception):
                raise
        else:
            _deliver(job, result, None)


def interrupted(exc: BaseException) -> BaseException:
    """What an async caller gets for a BaseException raised on the worker: a CancelledError from a
    fetcher or a KeyboardInterrupt there is not the caller's own cancellation, so it becomes a
    ScreeningError (the original as its cause)."""
    if isinstance(exc, Exception):
        return exc
    err = ScreeningError(f"the guard's work was interrupted on its worker thread: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _deliver(job: Job, result: Any, exc: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
        pass


def _worker_main(ref: weakref.ref[GuardWorker], q: queue.Queue) -> None:
    held: deque = deque()
    while True:
        if held:
            job = held.popleft()
        else:
            try:
                job = q.get(timeout=1.0)
            except queue.Empty:
                if ref() is None:
                    return
                continue
        worker = ref()
        if job is None or worker is None:
            return
        try:
            if job.kind == "screen":
                worker._run_screen_jobs(worker._collect(job, q, held))
            else:
                worker._run_call_job(job)
        except BaseException:  # never let the worker die with callers waiting
            log.exception("ohd-guard worker failed")
        del worker
