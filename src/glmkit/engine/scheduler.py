"""Serve many requests from one model: a worker thread admits requests between decode steps.

Servers call ``submit`` (threads) or ``stream`` (asyncio).  Each request keeps its own sampling
settings and finishes on its own; a cancelled request (a client that went away) leaves at the next
step and frees its place.  Past ``max_active + max_queue`` requests, ``QueueFull`` is raised so the
server can answer 429 instead of queueing without bound.

Models with ``decode_rows`` (``models/llama.py``, ``models/chatglm.py``, ``models/chatglm2.py``) decode all
active requests as one batch: each request owns a row of one KV cache and sits at its own position, and
every step is the engine's ``DecodeStep`` (a replayed CUDA graph per batch-size bucket on CUDA) followed
by one batched draw of the ``Sampler`` and one host sync.  Other models get the same interface with
requests advanced in turn, one step each.

The batch cache's size is fixed when the scheduler starts: rows of ``context_length`` positions, as
many as ``max_active`` asks and the memory budget (``kv_cache_bytes``) holds (``max_active`` is lowered
to that).  It is allocated at the first request and given back when idle, never grown or copied.  A new
request's prompt is prefilled into its row ``prefill_chunk`` tokens at a time between decode steps, so
a long prompt holds the running streams up by one chunk at most (alone, it is prefilled at once); new
prompts that fit in a chunk together are prefilled in one forward (causal families only).
A finished request's row keeps the keys and values of its tokens: a new request whose prompt starts
with them (the next turn of a conversation, the same system prompt) takes that row and prefills only
the rest (``reused_tokens`` counts what was saved), for models with ``supports_prefix_reuse``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.engine.config import GenerationConfig
from glmkit.engine.generate import Engine, shared_prefix
from glmkit.engine.reply import Chunk, ReplyBuilder
from glmkit.engine.sampling import Sampler
from glmkit.engine.step import DecodeStep, window_for
from glmkit.errors import GlmkitError
from glmkit.models.base import KVCache

logger = logging.getLogger(__name__)

# what a request's callback receives: a chunk, an error, or None once the stream has ended
Delivery = Callable[[Chunk | BaseException | None], None]


class QueueFull(GlmkitError):
    """The scheduler already holds as many requests as it may; try again later."""


class SchedulerClosed(GlmkitError):
    """The scheduler is shutting down, or its worker stopped, and takes no more work."""


# an idle scheduler gives its batch cache back after this long, so a burst does not hold memory for good
IDLE_RELEASE_SECONDS = 30.0
DEFAULT_PREFILL_CHUNK = 2048  # measured: smaller chunks stalled the running streams more at 1,024 tokens
# without --kv-cache-gb: this share of the GPU memory free after loading, or this much elsewhere
DEFAULT_GPU_CACHE_SHARE = 0.8
DEFAULT_HOST_CACHE_BYTES = 2 * 2**30


@dataclass(eq=False)  # a request is itself, never equal to another by its fields
class RequestHandle:
    deliver: Delivery
    prompt_ids: list[int]
    config: GenerationConfig
    cancelled: threading.Event = field(default_factory=threading.Event)
    stream: Iterator[Chunk] | None = None  # interleaved mode: the request's own decode loop

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, item: Chunk | BaseException | None) -> None:
        """Deliver to the caller; a caller that can no longer take it (its event loop closed) is
        cancelled instead of breaking the worker."""
        try:
            self.deliver(item)
        except Exception:
            self.cancel()


@dataclass(eq=False)
class _Row:
    """A request decoding in row ``slot`` of the shared cache (batched mode)."""

    handle: RequestHandle
    reply: ReplyBuilder
    slot: int
    last_token: int
    limit: int  # the most positions the request can fill: prompt + token budget
    cache: KVCache  # the row as a one-row cache (its model state, for reuse by a later prompt)
    tokens: list[int]  # the ids whose keys and values the row holds, one a filled position


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is going into row ``slot``, a chunk at a time (batched mode)."""

    handle: RequestHandle
    reply: ReplyBuilder
    slot: int
    cache: KVCache  # the row, as a one-row cache that keeps its length between chunks
    done: int = 0  # prompt tokens in the cache so far

    @property
    def limit(self) -> int:
        return len(self.handle.prompt_ids) + self.reply.budget


def cache_rows(model: Any, wanted: int, context_length: int, row_bytes: int, budget_bytes: int | None) -> int:
    """How many rows of ``context_length`` positions (``row_bytes`` each) the batch cache gets: ``wanted``,
    or as many as ``budget_bytes`` holds (default: ``DEFAULT_GPU_CACHE_SHARE`` of the free GPU memory, or
    ``DEFAULT_HOST_CACHE_BYTES`` on a CPU or MPS)."""
    if budget_bytes is None:
        device = model.device
        if device.type == "cuda":
            budget_bytes = int(DEFAULT_GPU_CACHE_SHARE * torch.cuda.mem_get_info(device)[0])
        else:
            budget_bytes = DEFAULT_HOST_CACHE_BYTES
    rows = min(wanted, budget_bytes // row_bytes)
    if rows < 1:
        raise GlmkitError(
            f"a KV cache of {budget_bytes / 2**30:.2f} GiB holds no request of {context_length} tokens "
            f"({row_bytes / 2**30:.2f} GiB each): raise --kv-cache-gb or lower --max-model-len"
        )
    return rows


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        max_active: int = 16,
        max_queue: int = 64,
        max_sequence_length: int = 4096,
        on_failure: Callable[[BaseException], None] | None = None,
        idle_release_seconds: float = IDLE_RELEASE_SECONDS,
        kv_cache_bytes: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk < 1:
            raise GlmkitError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self.engine = engine
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.batched = hasattr(engine.model, "decode_rows")
        #: the longest prompt + reply one request may have (a row of the batch cache holds this many)
        self.context_length = min(engine.model.context_length, max_sequence_length)
        # what one row of the batch cache holds (a one-position cache measured, times the row's length)
        self._row_bytes = engine.model.new_cache(1, 1).nbytes * self.context_length if self.batched else 0
        #: requests decoding at once; in batched mode the rows of the batch cache
        self.max_active = max_active
        if self.batched:
            self.max_active = cache_rows(engine.model, max_active, self.context_length, self._row_bytes, kv_cache_bytes)
        if self.batched and self.max_active < max_active:
            # a budget the user set is worth a warning; the default one (2 GiB on a CPU) only an info line
            logger.log(
                logging.WARNING if kv_cache_bytes is not None else logging.INFO,
                "glmkit: the KV cache holds %d requests of %d tokens at once (of %d asked for); the rest wait",
                self.max_active, self.context_length, max_active,
            )  # fmt: skip
        self._cache: KVCache | None = None  # allocated at the first batched request, given back when idle
        self._step: DecodeStep | None = None  # the decode step and sampling state over its rows
        self._sampler: Sampler | None = None
        self._in_flight: tuple[list[_Row], torch.Tensor] | None = None  # rows and logits of a launched step
        self._waiting: deque[RequestHandle] = deque()
        self._active: list[RequestHandle] = []
        self._rows: list[_Row] = []
        self._prefilling: deque[_Prefill] = deque()
        # free rows that still hold a finished request's keys/values: the ids they hold, the row's cache
        self._kept: dict[int, tuple[list[int], KVCache]] = {}
        #: prompt tokens that did not need prefilling, their keys and values being in a row already
        self.reused_tokens = 0
        #: prompts prefilled in one forward with others (``_prefill_together``)
        self.prompts_prefilled_together = 0
        self._wakeup = threading.Condition()
        self._closed = False
        #: what stopped the worker, if anything did; then every request is refused
        self.failure: BaseException | None = None
        self._on_failure = on_failure
        self._idle_release_seconds = idle_release_seconds
        self._thread = threading.Thread(target=self._run, name="glmkit-scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the worker is running and takes requests."""
        return self.failure is None and self._thread.is_alive()

    @property
    def cache_bytes(self) -> int:
        """Memory held by the batch KV cache now (0 once an idle scheduler has given it back)."""
        return getattr(self._cache, "nbytes", 0)

    @property
    def cache_budget_bytes(self) -> int:
        """What the batch KV cache holds once allocated: known from the start, the same at every request."""
        return self._row_bytes * self.max_active

    @property
    def load(self) -> tuple[int, int]:
        """(requests decoding now, requests waiting)."""
        with self._wakeup:
            return len(self._active), len(self._waiting)

    def submit(self, prompt_ids: list[int], config: GenerationConfig, deliver: Delivery) -> RequestHandle:
        handle = RequestHandle(deliver=deliver, prompt_ids=prompt_ids, config=config)
        with self._wakeup:
            if self._closed:
                raise SchedulerClosed("the server is shutting down")
            if self.failure is not None:
                raise SchedulerClosed(f"the generation worker has stopped ({self.failure!r})")
            self._waiting = deque(h for h in self._waiting if not h.cancelled.is_set())
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
    def _run(self) -> None:
        # inference mode for the whole thread: interleaved requests' generators enter and leave their
        # own inference_mode blocks out of order, which would otherwise switch it off under another one
        try:
            with torch.inference_mode():
                self._serve()
        except BaseException as exc:  # a defect outside any request: refuse work from now on, loudly
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._wakeup:
            self.failure = exc
            pending = [*self._active, *self._waiting]
            self._active, self._waiting = [], deque()
        for handle in pending:
            handle.send(SchedulerClosed(f"the generation worker has stopped ({exc!r})"))
        if self._on_failure is not None:
            self._on_failure(exc)

    def _serve(self) -> None:
        step = self._step_batched if self.batched else self._step_interleaved
        while True:
            admitted = self._admit()
            with self._wakeup:
                if self._closed:
                    for handle in [*self._active, *self._waiting]:
                        handle.send(SchedulerClosed("the server is shutting down"))
                    return
            try:
                step(admitted)
            except Exception as exc:
                # each request's own work is guarded where it runs; this is a defect in the step itself,
                # so the requests in it fail and the worker starts over with a fresh batch
                self._abandon_all(exc)

    def _abandon_all(self, exc: Exception) -> None:
        with self._wakeup:
            handles, self._active = self._active, []
        for handle in handles:
            if handle.stream is not None:
                handle.stream.close()
            handle.send(exc)
        self._rows = []
        self._prefilling.clear()
        self._release_cache()

    def _release_cache(self) -> None:
        self._kept.clear()
        self._cache, self._step, self._sampler, self._in_flight = None, None, None, None

    def _admit(self) -> list[RequestHandle]:
        """Wait for work; move waiting requests into free places and return them."""
        admitted = []
        with self._wakeup:
            while not self._closed and not self._waiting and not self._active:
                if not self._wakeup.wait(timeout=self._idle_release_seconds):
                    self._release_cache()  # idle for a while: give the batch cache's memory back
            while self._waiting and len(self._active) < self.max_active:
                handle = self._waiting.popleft()
                if not handle.cancelled.is_set():
                    self._active.append(handle)
                    admitted.append(handle)
        return admitted

    def _retire(self, handles: list[RequestHandle]) -> None:
        if handles:
            with self._wakeup:
                self._active = [h for h in self._active if h not in handles]

    # interleaved: each request runs its own loop, advanced one piece at a time in turn
    def _step_interleaved(self, admitted: list[RequestHandle]) -> None:
        for handle in admitted:
            handle.stream = self.engine.stream(handle.prompt_ids, handle.config)
        self._retire([handle for handle in list(self._active) if self._advance(handle)])

    def _advance(self, handle: RequestHandle) -> bool:
        """Advance one request by one piece; return whether it has finished."""
        assert handle.stream is not None
        if handle.cancelled.is_set():
            handle.stream.close()
            return True
        try:
            chunk = next(handle.stream)
        except StopIteration:
            handle.send(None)
            return True
        except Exception as exc:  # delivered to the request's caller; the worker lives on
            handle.send(exc)
            return True
        handle.send(chunk)
        return chunk.finish_reason is not None

    # batched: one decode step gives every active request its next token.  Steps are pipelined: the step
    # launched at the end of one call is sampled at the start of the next, and the device runs the next
    # step while the host hands out the tokens of the last one (a finished row's extra step is ignored)
    def _step_batched(self, admitted: list[RequestHandle]) -> None:
        finished: list[_Row] = []
        sampled = self._sample_in_flight(finished)
        for handle in admitted:
            self._start_prefill(handle)
        for row in self._prefill_chunks():
            if self._emit(row):
                finished.append(row)
        finished += [r for r in self._rows if r.handle.cancelled.is_set() and r not in finished]
        self._launch([r for r in self._rows if r not in finished])
        if sampled is not None:
            rows, wait = sampled
            try:
                token_ids = wait()  # the one host sync of a step, for all rows together
            except Exception as exc:  # the whole batch fails together; the worker lives on
                self._fail_rows(rows, exc, finished)
            else:
                for row in rows:
                    if row not in finished:
                        row.tokens.append(row.last_token)  # the step stored its key and value
                        row.last_token = token_ids[row.slot]
                        if self._emit(row):
                            finished.append(row)
        self._rows = [r for r in self._rows if r not in finished]
        if self.engine.model.supports_prefix_reuse:
            self._kept.update((r.slot, (r.tokens, r.cache)) for r in finished)
        self._retire([r.handle for r in finished])

    def _launch(self, rows: list[_Row]) -> None:
        """Start a decode step for ``rows`` (rows 0..n-1 step together, free rows among them idle along;
        requests take the lowest free row)."""
        if not rows:
            return
        assert self._step is not None and self._cache is not None
        n = max(r.slot for r in rows) + 1
        # the window holds every row's longest request, those being prefilled too: what the step writes
        # for their idle rows then lands past their prompts (see DecodeStep)
        longest = max(r.limit for r in [*rows, *self._prefilling])
        window = window_for(longest, self._cache.max_length)
        for slot, (tokens, cache) in self._kept.items():
            if slot < n and len(tokens) >= window:  # idle in this step: it writes at the window's end at most
                self._kept[slot] = (tokens[: window - 1], cache)
        try:
            self._in_flight = (rows, self._step.run(n, window))
        except Exception as exc:
            self._fail_rows(rows, exc, [])

    def _sample_in_flight(self, finished: list[_Row]) -> tuple[list[_Row], Callable[[], list[int]]] | None:
        """Sample the step in flight, feed its tokens to the next step and start copying them to the host."""
        if self._in_flight is None:
            return None
        (rows, logits), self._in_flight = self._in_flight, None
        rows = [r for r in rows if r in self._rows and not r.handle.cancelled.is_set()]
        if not rows:
            return None
        assert self._step is not None and self._sampler is not None
        try:
            tokens = self._sampler.sample(logits, slice(0, logits.shape[0]))
            self._step.feed(tokens)
            return rows, self._step.to_host(tokens)
        except Exception as exc:
            self._fail_rows(rows, exc, finished)
            return None

    def _fail_rows(self, rows: list[_Row], exc: Exception, finished: list[_Row]) -> None:
        for row in rows:
            if row not in finished:
                row.handle.send(exc)
                row.reply.done = True
                finished.append(row)

    def _start_prefill(self, handle: RequestHandle) -> None:
        """Give a new request a free row; its prompt goes in by ``_prefill_chunks``."""
        model = self.engine.model
        try:
            reply = self.engine.new_reply(len(handle.prompt_ids), handle.config, self.context_length)
            if self._cache is None:
                self._cache = model.new_cache(self.max_active, self.context_length)
                self._step = DecodeStep(model, self._cache)
                self._sampler = Sampler(self.max_active, model.device)
            assert self._step is not None
            slot, reused = self._free_row(handle.prompt_ids)
            # while the row is prefilled, decode steps write its idle slot past the prompt (see _launch)
            self._step.place(slot, 0, len(handle.prompt_ids))
        except Exception as exc:  # this request fails alone
            handle.send(exc)
            self._retire([handle])
            return
        kept = self._kept.pop(slot, None)
        if reused:
            cache = kept[1]
            cache.length = reused
            self.reused_tokens += reused
        else:
            cache = self._cache.row(slot)
        self._prefilling.append(_Prefill(handle, reply, slot, cache, done=reused))

    def _free_row(self, prompt: list[int]) -> tuple[int, int]:
        """A free row for ``prompt`` and how many of its first tokens that row holds already: the row
        holding the longest start of it, else one that holds nothing, else the lowest."""
        used = {r.slot for r in self._rows} | {p.slot for p in self._prefilling}
        free = [i for i in range(self.max_active) if i not in used]
        best, reused = None, 0
        for slot in free:
            if slot in self._kept:
                # the last prompt id must run, for the first logits
                common = min(shared_prefix(self._kept[slot][0], prompt), len(prompt) - 1)
                if common > reused:
                    best, reused = slot, common
        if best is not None:
            return best, reused
        return next((i for i in free if i not in self._kept), free[0]), 0

    def _prefill_chunks(self) -> list[_Row]:
        """Run up to ``prefill_chunk`` prompt tokens (all of them when nothing is decoding) into the rows
        being prefilled, oldest first; return the rows whose prompt is complete, first token sampled.
        New prompts that fit in a chunk together go in as one batch (``_prefill_together``)."""
        model = self.engine.model
        # a prompt can be cut only where a cache filled by its start serves the rest (not ChatGLM-6B's,
        # whose prompt attends both ways, nor padded on the right)
        causal = model.supports_prefix_reuse
        budget = self.prefill_chunk if self._rows and causal else None
        together = causal
        ready = []
        while self._prefilling and (budget is None or budget > 0):
            group = self._fresh_prompts(self.prefill_chunk if budget is None else budget) if together else []
            if len(group) > 1:
                rows = self._prefill_together(group)
                if rows is not None:
                    ready += rows
                    if budget is not None:
                        budget -= len(group) * max(len(p.handle.prompt_ids) for p in group)
                    continue
                together = False  # the batch failed (memory, say): each prompt alone, failing alone
            pending = self._prefilling[0]
            handle, prompt = pending.handle, pending.handle.prompt_ids
            if handle.cancelled.is_set():
                self._prefilling.popleft()
                self._retire([handle])
                continue
            end = len(prompt) if budget is None else min(len(prompt), pending.done + budget)
            try:
                chunk = torch.tensor([prompt[pending.done : end]], device=model.device)
                logits = model(chunk, cache=pending.cache, last_only=True).logits[:, -1]
                if end == len(prompt):
                    first = int(self._first_token(pending, logits))
            except Exception as exc:  # this request fails alone
                self._prefilling.popleft()
                handle.send(exc)
                self._retire([handle])
                continue
            if budget is not None:
                budget -= end - pending.done
            pending.done = end
            if end == len(prompt):
                self._prefilling.popleft()
                ready.append(self._decoding(pending, first))
        return ready

    def _fresh_prompts(self, tokens: int) -> list[_Prefill]:
        """The leading requests being prefilled that have nothing in their row yet and, padded to the
        longest of them, fit in ``tokens`` positions together."""
        group: list[_Prefill] = []
        longest = 0
        for pending in self._prefilling:
            length = len(pending.handle.prompt_ids)
            if pending.done or pending.handle.cancelled.is_set() or (len(group) + 1) * max(longest, length) > tokens:
                break
            group.append(pending)
            longest = max(longest, length)
        return group

    def _prefill_together(self, group: list[_Prefill]) -> list[_Row] | None:
        """Prefill ``group``'s prompts in one forward, padded on the right, into a scratch cache whose rows
        are then copied to the requests' rows; None if that failed (nothing is changed then).  One
        forward of many short prompts costs about what one of them does alone (a forward of a few
        hundred tokens is bound by its kernel launches on a GPU)."""
        model = self.engine.model
        prompts = [p.handle.prompt_ids for p in group]
        width = max(map(len, prompts))
        try:
            padded = torch.tensor([ids + ids[-1:] * (width - len(ids)) for ids in prompts], device=model.device)
            lengths = torch.tensor([len(ids) for ids in prompts], device=model.device)
            scratch = model.new_cache(len(group), width)
            logits = model(padded, cache=scratch, last_only=True, lengths=lengths).logits[:, -1]
            assert self._cache is not None
            slots = torch.tensor([p.slot for p in group], device=model.device)
            # what the padding left past each prompt lies where that row's decoding writes before it reads
            stores, fills = [*self._cache.keys, *self._cache.values], [*scratch.keys, *scratch.values]
            for stored, fresh in zip(stores, fills, strict=True):
                stored[:, :, :width].index_copy_(0, slots.to(stored.device), fresh)  # layers may sit on other GPUs
            firsts = torch.cat([self._first_token(p, logits[j : j + 1]) for j, p in enumerate(group)]).tolist()
        except Exception:
            logger.debug("glmkit: a batched prefill failed; its prompts go in one at a time", exc_info=True)
            return None
        self.prompts_prefilled_together += len(group)
        rows = []
        for pending, first in zip(group, firsts, strict=True):
            self._prefilling.popleft()
            pending.cache.length = pending.done = len(pending.handle.prompt_ids)
            rows.append(self._decoding(pending, first))
        return rows

    def _first_token(self, pending: _Prefill, logits: torch.Tensor) -> torch.Tensor:
        """Sample the request's first token from its prompt's last ``logits`` and put it in its row."""
        assert self._step is not None and self._sampler is not None
        prompt = pending.handle.prompt_ids
        self._sampler.assign(pending.slot, pending.handle.config, prompt)
        token = self._sampler.sample(logits, slice(pending.slot, pending.slot + 1))
        self._step.place(pending.slot, token[0], len(prompt))
        return token

    def _decoding(self, pending: _Prefill, first: int) -> _Row:
        """A prefilled request as a decoding row."""
        prompt = pending.handle.prompt_ids
        row = _Row(pending.handle, pending.reply, pending.slot, first, pending.limit, pending.cache, list(prompt))
        self._rows.append(row)
        return row

    def _emit(self, row: _Row) -> bool:
        """Hand the row's newest token to its reply; return whether the request has finished."""
        if row.reply.done:
            return True
        try:
            chunks = row.reply.push(row.last_token)
        except Exception as exc:  # e.g. a token the tokenizer cannot decode: this request only
            row.handle.send(exc)
            return True
        for chunk in chunks:
            row.handle.send(chunk)
        return row.reply.done
