"""The decode step: one new token for rows ``0..n-1`` of a fixed-capacity KV cache, static shapes.

The tokens and positions of the rows live in device buffers that the step reads and advances itself,
so a step needs nothing from the host.  A step attends over a window of the cache, the first ``window``
positions of each row (``window_for``: a power of two that holds every row's longest possible
request), as views of the one storage: a request that grows never copies the cache.  On CUDA the
step is compiled (``torch.compile``, the batch and the cache's sizes marked dynamic so that one
compilation serves every bucket and window) and captured as one CUDA graph per batch-size bucket
(``BUCKETS``) and window: a step of ``n`` rows replays the graph of the smallest bucket that holds
them, the rows past ``n`` being idle rows whose outputs nobody reads.
Elsewhere (CPU, MPS) the same step runs eagerly.  ``GLMKIT_DECODE`` overrides the choice:
``eager``, ``graphs`` (captured but not compiled) or ``compiled`` (without graphs off CUDA).

The model provides ``decode_rows(input_ids [n, 1], cache, None, positions [n]) -> logits [n, vocab]``
(``models/chatglm2.py``, ``models/llama.py``); prefill stays the model's ordinary ``forward``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from glmkit.models.base import KVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMALLEST_WINDOW = 256
MODES = ("eager", "graphs", "compiled")

logger = logging.getLogger(__name__)
_noticed: set[str] = set()


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


def window_for(length: int, capacity: int) -> int:
    """The window that holds rows of up to ``length`` positions: few sizes, so few graphs."""
    window = SMALLEST_WINDOW
    while window < length:
        window *= 2
    return min(window, capacity)


def _decode(model: Any, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
    # an idle row (free, or still being prefilled) may sit past a smaller window than its last one:
    # held at the window's last index, what it writes lies past anything its row has stored, and is
    # written over before it is read
    positions.clamp_(max=cache.max_length - 1)
    logits = model.decode_rows(tokens, cache, None, positions)
    positions.copy_((positions + 1).clamp(max=cache.max_length - 1))
    return logits


@functools.cache
def _compiled_decode() -> Any:
    return torch.compile(_decode)


class DecodeStep:
    """Rows ``0..n-1`` of ``cache`` decoded by ``model`` one token at a time.

    ``place`` puts a row's next input token and its position (its length so far) into the buffers,
    ``run(n, window)`` runs one step for rows ``0..n-1`` over the first ``window`` positions (default: the
    whole cache) and returns their logits ``[n, vocab]`` (valid until the next ``run``); ``feed(tokens)``
    sets the next input tokens of rows ``0..n-1`` from the device.
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
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self._graphed else None  # one pool for all buckets
        self._host = torch.empty(self.rows, dtype=torch.int64, pin_memory=self._graphed)
        self._windows: dict[int, KVCache] = {}

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

    def run(self, n: int, window: int | None = None) -> torch.Tensor:
        window = min(window or self.cache.max_length, self.cache.max_length)  # the cache is never a window
        if not self._graphed:
            return self._forward(n, window)
        key = (bucket(n, self.rows), window)
        if key not in self._graphs:
            self._graphs[key] = self._capture(*key)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

    def _forward(self, b: int, window: int) -> torch.Tensor:
        tokens, positions = self.tokens[:b], self.positions[:b]
        cache = self.cache if window == self.cache.max_length else self._window(window)
        if self.mode != "compiled":
            return _decode(self.model, tokens, cache, positions)
        if b > 1:  # one compilation for every bucket above 1 and every cache size (1 stays specialised)
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
            torch._dynamo.maybe_mark_dynamic(positions, 0)
        for t in (*cache.keys, *cache.values):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if cache.window_positions is not None:  # one compilation for every window
            torch._dynamo.maybe_mark_dynamic(cache.window_positions, 0)
        return _compiled_decode()(self.model, tokens, cache, positions)

    def _window(self, length: int) -> KVCache:
        """The cache as a window of ``length`` positions (its own tensors and state, made once a length)."""
        if length not in self._windows:
            self._windows[length] = self.cache.window(length)
        return self._windows[length]

    def _capture(self, b: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm-up runs (compilation, autotuning, lazy state such as a P-Tuning prefix) happen outside the
        # graph, on a side stream as capture wants; they write the rows' current slots, which the real
        # step writes again, and advance the positions, which are put back
        saved = self.positions.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(b, window)
        torch.cuda.current_stream().wait_stream(stream)
        self.positions.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._forward(b, window)
        return graph, logits
