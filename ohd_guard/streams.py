"""The guard's streams: :meth:`OhdGuard.stream <ohd_guard.guard.OhdGuard.stream>` (a thread holding the
guard's lock) and :meth:`OhdGuard.astream <ohd_guard.guard.OhdGuard.astream>` (a ``generate`` job on the
worker, decoded in its batch). Nothing is streamed before the verdict; a stream dropped by ``break`` or
garbage collection stops its decoding within a token."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ohd_guard.types import GuardedResponse, Verdict
from ohd_guard.worker import GenerateRequest, GuardWorker


class StreamSource(Protocol):
    """What a stream needs of :class:`~ohd_guard.guard.OhdGuard` (named here so that this module does
    not import the guard, which imports it)."""

    _lock: threading.RLock
    worker: GuardWorker

    def _respond(self, raw: Any, t0: float, gen_kwargs: dict[str, Any], on_chunk: Callable[[str], None] | None = ...,
                 on_verdict: Callable[[Verdict], None] | None = ..., cancel: threading.Event | None = ...
                 ) -> GuardedResponse: ...  # fmt: skip

__all__ = ["AsyncGuardedStream", "GuardedStream"]


@dataclass
class _Failure:
    exc: BaseException


_END = object()


class _StreamState:
    """What a stream's producer shares with its consumer. The producer (a thread, or a job on the
    worker) holds only this, never the stream object, so a stream dropped by ``break`` or garbage
    collection is really collected, and its ``__del__`` stops the decoding loop."""

    def __init__(self, raw: Any, gen_kwargs: dict[str, Any]) -> None:
        self.raw, self.gen_kwargs, self.t0 = raw, gen_kwargs, time.perf_counter()
        self.cancel = threading.Event()
        self.verdict: Verdict | None = None
        self.response: GuardedResponse | None = None

    def produce(self, guard: StreamSource, push: Callable[[Any], None]) -> None:
        try:
            self.response = guard._respond(self.raw, self.t0, self.gen_kwargs, on_chunk=push, cancel=self.cancel,
                                           on_verdict=lambda v: setattr(self, "verdict", v))  # fmt: skip
            push(_END)
        except BaseException as e:
            push(_Failure(e))


class _StreamBase:
    """Shared state of sync and async streams: ``verdict`` is set before the first chunk arrives,
    ``response`` once the stream is exhausted."""

    def __init__(self, guard: StreamSource, raw: Any, gen_kwargs: dict[str, Any]):
        self._guard = guard
        self._state = _StreamState(raw, gen_kwargs)
        self._done = False

    @property
    def verdict(self) -> Verdict | None:
        return self._state.verdict

    @property
    def response(self) -> GuardedResponse | None:
        return self._state.response

    def _item(self, item: Any) -> str:
        if item is _END or isinstance(item, _Failure):
            self._done = True
            if isinstance(item, _Failure):
                raise item.exc
            raise StopIteration
        return item


class GuardedStream(_StreamBase):
    """Iterator of answer chunks from :meth:`OhdGuard.stream`; generation runs in a thread holding
    the guard's lock, and stops within one token when the stream is closed or garbage-collected."""

    _thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._q: queue.Queue = queue.Queue()
            guard, state, q = self._guard, self._state, self._q

            def run() -> None:  # references the state, not the stream
                with guard._lock:
                    state.produce(guard, q.put)

            self._thread = threading.Thread(target=run, name="ohd-guard-stream", daemon=True)
            self._thread.start()
        return self._item(self._q.get())

    def close(self) -> None:
        self._state.cancel.set()
        self._done = True

    def __del__(self) -> None:
        self._state.cancel.set()


class AsyncGuardedStream(_StreamBase):
    """Async iterator of answer chunks from :meth:`OhdGuard.astream`, produced on the worker thread."""

    _q: asyncio.Queue | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        if self._q is None:
            loop = asyncio.get_running_loop()
            self._q = asyncio.Queue()
            guard, state, q = self._guard, self._state, self._q

            def push(item: Any) -> None:
                try:
                    loop.call_soon_threadsafe(q.put_nowait, item)
                except RuntimeError:  # loop closed: the consumer is gone
                    state.cancel.set()

            def finish(response: GuardedResponse | None, exc: BaseException | None) -> None:
                state.response = response
                push(_END if exc is None else _Failure(exc))

            def on_verdict(v: Verdict) -> None:
                state.verdict = v

            gen = GenerateRequest(state.gen_kwargs, state.cancel, on_chunk=push, on_verdict=on_verdict, on_finish=finish)
            self._job = guard.worker.submit("generate", raw=state.raw, cancel=state.cancel, gen=gen)
            self._job.add_done_callback(lambda f: f.cancelled() or f.exception())  # errors reach the consumer as chunks
        try:
            return self._item(await self._q.get())
        except StopIteration:
            raise StopAsyncIteration from None
        except asyncio.CancelledError:
            self._state.cancel.set()
            raise

    async def aclose(self) -> None:
        self._state.cancel.set()
        self._done = True

    def __del__(self) -> None:
        self._state.cancel.set()
