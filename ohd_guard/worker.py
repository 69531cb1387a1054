"""The guard's async side: one worker thread owns the model for async callers.

Concurrent ``ascreen`` requests arriving within ``max_wait_ms`` are micro-batched into one batched
prefill. Concurrent ``agenerate``/``astream`` requests (``generate`` jobs) are screened the same
way, then decode together: every answer in flight advances by one token per batched forward
(:class:`~ohd_guard.batching.DecodeBatch`, continuous batching: a request joins after its screening
prefill, between two steps, and leaves when it ends or its caller cancels); at most
``max_decode_batch`` rows decode at once and the others wait screened-not-yet. Other work (``call``
jobs) runs between steps, one at a time. Every waiting caller always gets
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


Kind = Literal["screen", "call", "generate"]


@dataclass
class GenerateRequest:
    """What a ``generate`` job asks: generation kwargs, and the caller's callbacks (run on the worker)."""

    kwargs: dict[str, Any]
    cancel: threading.Event
    on_chunk: Callable[[str], None] | None = None
    on_verdict: Callable[[Any], None] | None = None
    on_finish: Callable[[Any, BaseException | None], None] | None = None
    """Called with ``(response, error)`` just before the job's future is resolved (streams end here)."""


@dataclass
class Job:
    kind: Kind
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    raw: Any = None
    t0: float = 0.0
    fn: Callable[[], Any] | None = None
    gen: GenerateRequest | None = None
    """For ``generate`` jobs: what :meth:`GuardWorker.begin` needs (generation kwargs, chunk and
    verdict callbacks, the cancel event)."""


class GuardWorker:
    """Queue and thread of one guard's async calls.

    Args:
        lock: the guard's lock, held for every job and every decode step (sync callers share it).
        screen: ``screen(raws, t0s, keep_cache) -> [Screened]`` for a micro-batch (the screening stage).
        settle: ``settle(screened) -> Verdict``: publish and apply the error policy.
        begin: ``begin(job, screened, batch)``: answer or refuse one screened ``generate`` job, in the
            decode batch or at once; it resolves the job through :func:`deliver` exactly once.
        batch: the decode batch (its ``room`` bounds how many generate jobs are admitted).
    """

    def __init__(self, lock: threading.RLock, screen: Callable[..., list], settle: Callable[[Any], Any],
                 max_batch_size: int, max_wait_ms: float, begin: Callable[..., None] | None = None,
                 batch: Any = None):
        self.lock, self.screen, self.settle, self.begin, self.batch = lock, screen, settle, begin, batch
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.waiting: deque[Job] = deque()  # generate jobs not admitted yet (the decode batch is full)

    def submit(self, kind: Kind, raw: Any = None, fn: Callable[[], Any] | None = None,
               cancel: threading.Event | None = None, gen: GenerateRequest | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = Job(kind, loop, loop.create_future(), raw=raw, t0=time.perf_counter(), fn=fn, gen=gen)
        if cancel is not None:  # the caller cancelled (or timed out): stop the work it started
            job.future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        self._ensure_thread()
        self._queue.put(job)
        return job.future

    @property
    def decoding(self) -> int:
        """Answers decoding now."""
        return len(self.batch) if self.batch is not None else 0

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
    def _collect(self, first: Job, q: queue.Queue, held: deque, wait: bool) -> list[Job]:
        """Gather more jobs of ``first``'s kind until the batch is full or ``max_wait_ms`` has passed
        (no waiting while answers are decoding: they would stall); others wait in ``held``."""
        batch = [first]
        limit = self.max_batch_size
        if first.kind == "generate":
            limit = min(limit, max(1, self.batch.room))
        deadline = time.perf_counter() + (self.max_wait_ms / 1e3 if wait else 0.0)
        while len(batch) < limit:
            try:
                nxt = q.get(timeout=max(0.0, deadline - time.perf_counter())) if wait else q.get_nowait()
            except queue.Empty:
                break
            if nxt is not None and nxt.kind == first.kind:
                batch.append(nxt)
            else:
                held.append(nxt)  # other jobs and shutdown wait for this batch
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
                deliver(job, None, interrupted(e))
            if not isinstance(e, Exception):
                raise
            return
        for job, s in zip(jobs, results):
            try:
                deliver(job, self.settle(s), None)
            except BaseException as e:
                deliver(job, None, e)

    def _run_generate_jobs(self, jobs: list[Job]) -> None:
        """Screen a micro-batch of generate jobs in one prefill (keeping its cache), then start each:
        a row in the decode batch, or answered at once."""
        jobs = [j for j in jobs if not j.future.cancelled()]
        if not jobs:
            return
        try:
            with self.lock:
                results = self.screen([j.raw for j in jobs], [j.t0 for j in jobs], keep_cache=True)
                for job, s in zip(jobs, results):
                    self.begin(job, s, self.batch)  # type: ignore[misc]
        except BaseException as e:
            for job in jobs:
                deliver(job, None, interrupted(e))
            if not isinstance(e, Exception):
                raise

    def _step(self) -> None:
        try:
            with self.lock:
                self.batch.step()
        except BaseException as e:  # a KeyboardInterrupt mid-step: every row gets an answer
            self.batch.abort(interrupted(e))
            if not isinstance(e, Exception):
                raise

    def _run_call_job(self, job: Job) -> None:
        if job.future.cancelled():
            return
        try:
            with self.lock:
                result = job.fn()  # type: ignore[misc]
        except BaseException as e:
            deliver(job, None, interrupted(e))
            if not isinstance(e, Exception):
                raise
        else:
            deliver(job, result, None)

    def _admit(self, q: queue.Queue, held: deque) -> None:
        """Start the waiting generate jobs the decode batch has room for."""
        while self.waiting and self.batch.room > 0:
            first = self.waiting.popleft()
            jobs = [first]
            while self.waiting and len(jobs) < min(self.max_batch_size, self.batch.room):
                jobs.append(self.waiting.popleft())
            if len(jobs) < min(self.max_batch_size, self.batch.room):
                more = self._collect(first, q, held, wait=not self.decoding)[1:]
                jobs.extend(more)
            self._run_generate_jobs(jobs)

    def run_once(self, job: Job | None, q: queue.Queue, held: deque) -> None:
        """One turn of the worker loop for ``job`` (None: nothing new)."""
        if job is not None:
            if job.kind == "screen":
                self._run_screen_jobs(self._collect(job, q, held, wait=not self.decoding))
            elif job.kind == "generate":
                self.waiting.append(job)
            else:
                self._run_call_job(job)
        if self.waiting and self.batch is not None and self.batch.room > 0:
            self._admit(q, held)
        if self.decoding:
            self._step()

    def fail_all(self, exc: BaseException) -> None:
        """Every admitted and waiting generate job gets ``exc`` (shutdown)."""
        if self.batch is not None:
            self.batch.abort(exc)
        while self.waiting:
            deliver(self.waiting.popleft(), None, exc)


def interrupted(exc: BaseException) -> BaseException:
    """What an async caller gets for a BaseException raised on the worker: a CancelledError from a
    fetcher or a KeyboardInterrupt there is not the caller's own cancellation, so it becomes a
    ScreeningError (the original as its cause)."""
    if isinstance(exc, Exception):
        return exc
    err = ScreeningError(f"the guard's work was interrupted on its worker thread: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def deliver(job: Job, result: Any, exc: BaseException | None) -> None:
    """Resolve ``job``'s future on its caller's loop (from any thread; a second call is ignored)."""
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
        worker = ref()
        busy = worker is not None and (worker.decoding > 0 or bool(worker.waiting and worker.batch.room > 0))
        del worker
        if held:
            job = held.popleft()
        else:
            try:
                job = q.get_nowait() if busy else q.get(timeout=1.0)
            except queue.Empty:
                if ref() is None:
                    return
                if not busy:
                    continue
                job = _NOTHING
        worker = ref()
        if job is None or worker is None:
            if worker is not None:
                worker.fail_all(ScreeningError("the guard's worker was closed before the answer was done"))
            return
        try:
            worker.run_once(None if job is _NOTHING else job, q, held)
        except BaseException:  # never let the worker die with callers waiting
            log.exception("ohd-guard worker failed")
        del worker


_NOTHING: Any = object()
