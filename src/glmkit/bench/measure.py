"""The measurements of ``glmkit bench``: the device's limits, batch-1 decode, streams through the
scheduler, time to the first token, and transformers' ``generate`` on the same weights."""

from __future__ import annotations

import itertools
import os
import queue
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from glmkit.bench.stats import percentile
from glmkit.engine import Engine, GenerationConfig, iter_tokens
from glmkit.engine.scheduler import DEFAULT_PREFILL_CHUNK, Scheduler

GiB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], Any]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _median_seconds(fn: Callable[[], Any], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_seconds(fn) for _ in range(runs))


def copy_bandwidth(device: torch.device, size: int) -> float:
    """Bytes read plus written per second by a large copy on ``device`` (median of 10)."""
    src = torch.randn(size // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * size / _median_seconds(lambda: dst.copy_(src), 3, 10)


def matrix_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an ``n`` x ``n`` matmul in ``dtype`` (median of 5): the compute limit of a prefill."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _median_seconds(lambda: a @ b, 2, 5)


def weight_bytes(model: torch.nn.Module) -> int:
    """What one decode step reads of the weights: every parameter and buffer once (a quantized linear's
    integers and scales are buffers; a tied head is counted once)."""
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def decode_mode(mode: str) -> Iterator[None]:
    """``GLMKIT_DECODE`` set to ``mode`` while the block runs (the engine reads it when a step is made)."""
    before = os.environ.get("GLMKIT_DECODE")
    os.environ["GLMKIT_DECODE"] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ["GLMKIT_DECODE"]
        else:
            os.environ["GLMKIT_DECODE"] = before


@contextmanager
def peak_memory(into: dict[str, Any], model: torch.nn.Module) -> Iterator[None]:
    """Sets ``into["peak_gib"]`` on CUDA: ``model``'s weights plus the most allocated over the block above
    what was resident when it began, i.e. what the block needs alone (other models kept for later rows
    are left out).  A CPU has only the process's high-water mark: ``rss_high_water_gib``."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    yield
    if cuda:
        above = torch.cuda.max_memory_allocated() - resident
        into["peak_gib"] = round((weight_bytes(model) + above) / GiB, 2)


def rss_high_water_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 2)  # Linux: KiB


def decode_run(model: Any, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s after it, the tokens) for one greedy request."""
    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    sync()
    start = time.perf_counter()
    tokens: list[int] = []
    first = 0.0
    for token in iter_tokens(model, ids, config):
        if not tokens:
            first = time.perf_counter() - start
        tokens.append(token)
    sync()
    total = time.perf_counter() - start
    return first, (len(tokens) - 1) / (total - first), tokens


def batch1(model: Any, ids: list[int], new: int, repeats: int) -> dict[str, Any]:
    """Greedy decode of one request: tok/s from the first token to the last, median of ``repeats``
    after a warm-up run (compilation, graph capture)."""
    result: dict[str, Any] = {}
    with peak_memory(result, model):
        start = time.perf_counter()
        decode_run(model, ids, new)
        warm = time.perf_counter() - start
        runs = [decode_run(model, ids, new) for _ in range(repeats)]
    result.update(
        warmup_s=round(warm, 2),
        tok_s_runs=[round(r[1], 1) for r in runs],
        tok_s=round(statistics.median(r[1] for r in runs), 1),
        tokens=runs[0][2],
    )
    return result


def transformers_generate(hf: Any, ids: list[int], new: int, repeats: int) -> dict[str, Any]:
    """transformers' greedy ``generate`` (its default cache): tok/s over ``new`` tokens, median of
    ``repeats`` after a 4-token warm-up, and its time to the first token (``generate`` of one token)."""
    x = torch.tensor([ids], device=hf.device)

    def generate(count: int) -> torch.Tensor:
        return hf.generate(x, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    result: dict[str, Any] = {}
    with torch.inference_mode(), peak_memory(result, hf):
        generate(4)
        seconds = [_seconds(lambda: generate(new)) for _ in range(repeats)]
        tokens = generate(new)[0, len(ids) :].tolist()
    result.update(
        tok_s_runs=[round(new / s, 1) for s in seconds],
        tok_s=round(new / statistics.median(seconds), 1),
        tokens=tokens,
    )
    return result


def transformers_first_token_ms(hf: Any, ids: list[int], repeats: int) -> float:
    """Milliseconds of transformers' ``generate`` of one token after ``ids`` (median of ``repeats``)."""
    x = torch.tensor([ids], device=hf.device)
    with torch.inference_mode():
        return round(1e3 * _median_seconds(lambda: hf.generate(x, max_new_tokens=1, do_sample=False), 1, repeats), 1)


class CharTokenizer:
    """Random weights give random ids: any decode will do, as long as it costs what a real one would."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def gaps_ms(stamps: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]


def streams(model: Any, count: int, prompts: Callable[[int], list[int]], new: int) -> dict[str, Any]:
    """``count`` requests (``prompts(i)``) submitted at once to the scheduler: aggregate tok/s over the
    wall time and over the decode phase (from the moment every request has its first token); p50/p99
    of the gaps between a stream's tokens; the KV cache the scheduler fixed at start; peak memory."""
    scheduler = Scheduler(Engine(model, CharTokenizer()), max_active=count, max_queue=count)
    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    result: dict[str, Any] = {"streams": count}
    try:
        with peak_memory(result, model):
            # the first run is a warm-up of the same length (its requests reach the same cache windows): the
            # compilation and the graphs of every batch size and window, the first allocations.  An 8-token
            # one left the first steps over a 512-position window to the timed run: in an H200 run of the
            # streams alone the 64 streams' first tokens came after 2.8 s (not profiled further)
            for _ in range(2):
                inboxes: list[queue.Queue] = [queue.Queue() for _ in range(count)]
                sync()
                start = time.perf_counter()
                for i, inbox in enumerate(inboxes):  # items are stamped when the worker delivers them
                    scheduler.submit(prompts(i), config,
                                     lambda item, inbox=inbox: inbox.put((time.perf_counter(), item)))  # fmt: skip
                firsts, produced, end, gaps = [], 0, start, []
                for inbox in inboxes:
                    stamps = []
                    while True:
                        stamp, item = inbox.get(timeout=600)
                        if isinstance(item, BaseException):
                            raise item
                        stamps.append(stamp)
                        produced += len(item.token_ids)
                        if item.finish_reason:
                            break
                    firsts.append(stamps[0])
                    end = max(end, stamps[-1])
                    gaps += gaps_ms(stamps)
        budget_bytes = scheduler.cache_budget_bytes
    finally:
        scheduler.close()
    wall = end - start
    all_started = max(firsts) - start
    result.update(
        tokens=produced,
        wall_s=round(wall, 3),
        tok_s=round(produced / wall, 1),
        decode_tok_s=round((produced - count) / (wall - all_started), 1),
        last_first_token_s=round(all_started, 3),
        itl_p50_ms=round(percentile(gaps, 0.5), 2),
        itl_p99_ms=round(percentile(gaps, 0.99), 2),
        kv_cache_gib=round(budget_bytes / GiB, 3),
    )
    return result


def ttft(model: Any, ids: list[int], repeats: int) -> dict[str, Any]:
    """Time to the first token of ``ids`` alone (prefill and one token), median of ``repeats``."""
    result: dict[str, Any] = {"prompt_tokens": len(ids)}
    with peak_memory(result, model):
        decode_run(model, ids, 1)
        times = [decode_run(model, ids, 1)[0] for _ in range(repeats)]
    result.update(ms_runs=[round(t * 1e3, 1) for t in times], ms=round(statistics.median(times) * 1e3, 1))
    return result


def ttft_under_load(
    model: Any, others: int, prompts: Callable[[int], list[int]], newcomer: list[int], chunk: int | None = None
) -> dict:
    """``newcomer`` arriving while ``others`` streams (``prompts(i)``) decode: its time to first token,
    and the p99 gap between the running streams' tokens in the second before it and while it is prefilled
    (``chunk``: the scheduler's ``prefill_chunk``, default its own)."""
    scheduler = Scheduler(Engine(model, CharTokenizer()), max_active=others + 1, max_queue=others + 1,
                          prefill_chunk=chunk or DEFAULT_PREFILL_CHUNK)  # fmt: skip
    config = GenerationConfig(do_sample=False, max_new_tokens=2048)  # longer than the measurement
    stamps: list[list[float]] = [[] for _ in range(others)]
    result: dict[str, Any] = {"others": others, "prompt_tokens": len(newcomer), "chunk": scheduler.prefill_chunk}
    try:
        with peak_memory(result, model):
            handles = [
                scheduler.submit(prompts(i), config, lambda item, i=i: stamps[i].append(time.perf_counter()))
                for i in range(others)
            ]
            while min(len(s) for s in stamps) < 20:  # all decoding, graphs captured
                time.sleep(0.05)
            time.sleep(1.0)
            arrived = time.perf_counter()
            inbox: queue.Queue = queue.Queue()
            scheduler.submit(newcomer, config.updated(max_new_tokens=4), lambda item: inbox.put(time.perf_counter()))
            first = inbox.get(timeout=600)
            time.sleep(0.2)
            for handle in handles:
                handle.cancel()
    finally:
        scheduler.close()
    before = [g for s in stamps for g in gaps_ms([t for t in s if arrived - 1.0 <= t < arrived])]
    during = [g for s in stamps for g in gaps_ms([t for t in s if arrived - 0.05 <= t <= first + 0.05])]
    result.update(
        ttft_ms=round((first - arrived) * 1e3, 1),
        others_itl_p99_ms_before=round(percentile(before, 0.99), 2),
        others_itl_p99_ms_during=round(percentile(during, 0.99), 2) if during else None,
    )
    return result


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
