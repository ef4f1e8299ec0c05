"""Serve many requests from one model: a worker thread admits requests between decode steps.

Servers call ``submit`` (threads) or ``stream`` (asyncio).  Each request keeps its own sampling
settings and finishes on its own; a cancelled request (a client that went away) leaves at the next
step and frees its place.  Past ``max_active + max_queue`` requests, ``QueueFull`` is raised so the
server can answer 429 instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from glmkit.engine.config import GenerationConfig
from glmkit.engine.generate import Chunk, Engine
from glmkit.errors import GlmkitError

# what a request's callback receives: a chunk, an error, or None once the stream has ended
Delivery = Callable[[Chunk | BaseException | None], None]


class QueueFull(GlmkitError):
    """The scheduler already holds as many requests as it may; try again later."""


@dataclass
class RequestHandle:
    deliver: Delivery
    prompt_ids: list[int]
    config: GenerationConfig
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Iterator[Chunk] | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, engine: Engine, max_active: int = 16, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_active = max_active
        self.max_queue = max_queue
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[RequestHandle] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="glmkit-scheduler", daemon=True)
        self._thread.start()

    @property
    def load(self) -> tuple[int, int]:
        """(requests decoding now, requests waiting)."""
        with self._wakeup:
            return len(self._active), len(self._waiting)

    def submit(self, prompt_ids: list[int], config: GenerationConfig, deliver: Delivery) -> RequestHandle:
        handle = RequestHandle(deliver=deliver, prompt_ids=prompt_ids, config=config)
        with self._wakeup:
            if self._closed:
                raise GlmkitError("the scheduler is shut down")
            if len(self._active) + len(self._waiting) >= self.max_active + self.max_queue:
                raise QueueFull(f"{self.max_active + self.max_queue} requests are already running or queued")
            self._waiting.append(handle)
            self._wakeup.notify()
        return handle

    async def stream(self, prompt_ids: list[int], config: GenerationConfig) -> AsyncIterator[Chunk]:
        """Chunks of one request for asyncio code; closing the iterator cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        handle = self.submit(prompt_ids, config, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            handle.cancel()

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    # -- the worker -------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._wakeup:
            while not self._closed and not self._waiting and not self._active:
                self._wakeup.wait()
            while self._waiting and len(self._active) < self.max_active:
                handle = self._waiting.popleft()
                if handle.cancelled.is_set():
                    continue
                handle.stream = self.engine.stream(handle.prompt_ids, handle.config)
                self._active.append(handle)

    def _step(self, handle: RequestHandle) -> bool:
        """Advance one request by one piece; return whether it has finished."""
        assert handle.stream is not None
        if handle.cancelled.is_set():
            handle.stream.close()
            return True
        try:
            chunk = next(handle.stream)
        except StopIteration:
            handle.deliver(None)
            return True
        except Exception as exc:  # delivered to the request's caller; the worker lives on
            handle.deliver(exc)
            return True
        handle.deliver(chunk)
        return chunk.finish_reason is not None

    def _run(self) -> None:
        while True:
            self._admit()
            with self._wakeup:
                if self._closed:
                    for handle in [*self._active, *self._waiting]:
                        handle.deliver(GlmkitError("the server is shutting down"))
                    return
                active = list(self._active)
            finished = [handle for handle in active if self._step(handle)]
            with self._wakeup:
                self._active = [h for h in self._active if h not in finished]
