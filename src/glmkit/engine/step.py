"""The decode step: one new token for rows ``0..n-1`` of a fixed-capacity KV cache, static shapes.

The tokens and positions of the rows live in device buffers that the step reads and advances itself,
so a step needs nothing from the host.  On CUDA the step is compiled (``torch.compile``, the batch and
the cache's sizes marked dynamic so that one compilation serves every bucket and cache) and captured
as one CUDA graph per batch-size bucket (``BUCKETS``): a step of ``n`` rows replays the graph of the
smallest bucket that holds them, the rows past ``n`` being idle rows whose outputs nobody reads.
Elsewhere (CPU, MPS) the same step runs eagerly.  ``GLMKIT_DECODE`` overrides the choice:
``eager``, ``graphs`` (captured but not compiled) or ``compiled`` (without graphs off CUDA).

The model provides ``decode_rows(input_ids [n, 1], cache, None, positions [n]) -> logits [n, vocab]``
(``models/chatglm2.py``, ``models/llama.py``); prefill stays the model's ordinary ``forward``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from glmkit.models.base import KVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MODES = ("eager", "graphs", "compiled")

logger = logging.getLogger(__name__)
_noticed: set[str] = set()
_compiled: Any = None


def decode_mode(device: torch.device) -> str:
    """``GLMKIT_DECODE`` if set, else compiled CUDA graphs on CUDA and eager elsewhere."""
    mode = os.environ.get("GLMKIT_DECODE", "auto")
    if mode in MODES:
        return mode
    if device.type == "cuda":
        return "compiled"
    if device.type not in _noticed:
        _noticed.add(device.type)
        logger.warning("glmkit: decoding eagerly on %s (compiled CUDA graphs need a CUDA device)", device.type)
    return "eager"


def bucket(n: int, rows: int) -> int:
    """The batch size whose graph runs ``n`` rows of a cache that has ``rows``.  A cache of several rows
    (the scheduler's) never steps one row alone: a size-1 batch would be compiled on its own, and two
    rows cost a memory-bound step about what one does."""
    smallest = min(2, rows)
    return next((b for b in BUCKETS if max(n, smallest) <= b <= rows), rows)


def _decode(model: Any, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    logits = model.decode_rows(tokens, cache, None, positions)
    # advance the rows; an idle row is held at the last index, where nothing reads what it writes
    positions.copy_((positions + 1).clamp(max=cache.max_length - 1))
    return logits


def _compiled_decode() -> Any:
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_decode)
    return _compiled


class DecodeStep:
    """Rows ``0..n-1`` of ``cache`` decoded by ``model`` one token at a time.

    ``place`` puts a row's next input token and its position (its length so far) into the buffers,
    ``run(n)`` runs one step for rows ``0..n-1`` and returns their logits ``[n, vocab]`` (valid until the
    next ``run``); ``feed(tokens)`` sets the next input tokens of rows ``0..n-1`` from the device.
    """

    def __init__(self, model: Any, cache: KVCache, mode: str | None = None) -> None:
        self.model = model
        self.cache = cache
        device = cache.keys[0].device
        self.mode = mode or decode_mode(device)
        self.rows = cache.keys[0].shape[0]
        self.tokens = torch.zeros(self.rows, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.rows, dtype=torch.int64, device=device)
        # one graph captures one device's work: layers spread over GPUs decode without graphs
        one_device = len({t.device for t in cache.keys}) == 1
        self._graphed = self.mode != "eager" and device.type == "cuda" and one_device
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self._graphed else None  # one pool for all buckets
        self._host = torch.empty(self.rows, dtype=torch.int64, pin_memory=self._graphed)
        self._storage = cache.keys[0]  # a grown cache has new tensors: its graphs must be captured again

    def place(self, row: int, token: torch.Tensor | int, position: int) -> None:
        self.tokens[row, 0] = token
        self.positions[row] = position

    def feed(self, tokens: torch.Tensor) -> None:
        self.tokens[: tokens.shape[0], 0] = tokens

    def to_host(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying ``tokens`` to the host; the returned call waits for that copy alone (not for
        work queued after it) and gives the ids."""
        if not self._graphed:
            return tokens.tolist
        host = self._host[: tokens.shape[0]]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> list[int]:
            done.synchronize()
            return host.tolist()

        return wait

    def run(self, n: int) -> torch.Tensor:
        if not self._graphed:
            return self._forward(n)
        if self.cache.keys[0] is not self._storage:
            # a pool whose graphs are all gone is freed: the new graphs need a new one
            self._graphs.clear()
            self._pool = torch.cuda.graph_pool_handle()
            self._storage = self.cache.keys[0]
        b = bucket(n, self.rows)
        if b not in self._graphs:
            self._graphs[b] = self._capture(b)
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:n]

    def _forward(self, b: int) -> torch.Tensor:
        tokens, positions = self.tokens[:b], self.positions[:b]
        if self.mode != "compiled":
            return _decode(self.model, tokens, self.cache, positions)
        if b > 1:  # one compilation for every bucket above 1 and every cache size (1 stays specialised)
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
        for t in (*self.cache.keys, *self.cache.values):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        return _compiled_decode()(self.model, tokens, self.cache, positions)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm-up runs (compilation, autotuning, lazy state such as a P-Tuning prefix) happen outside the
        # graph, on a side stream as capture wants; they write the rows' current slots, which the real
        # step writes again, and advance the positions, which are put back
        saved = self.positions.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        self.positions.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(b)
        return graph, logits
