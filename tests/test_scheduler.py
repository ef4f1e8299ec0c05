"""Concurrent requests through the scheduler: batched rows (native Llama) and interleaved (others)."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from glmkit.engine import Engine, GenerationConfig
from glmkit.engine.scheduler import QueueFull, Scheduler
from glmkit.errors import GlmkitError

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the largest planet?",
]


def collect(scheduler: Scheduler, prompt_ids: list[int], config: GenerationConfig, timeout: float = 120):
    """Submit one request and wait for its whole reply; returns (text, final chunk)."""
    inbox: queue.Queue = queue.Queue()
    scheduler.submit(prompt_ids, config, inbox.put)
    text = ""
    while True:
        item = inbox.get(timeout=timeout)
        if item is None:
            raise AssertionError("stream ended without a final chunk")
        if isinstance(item, BaseException):
            raise item
        text += item.text
        if item.finish_reason:
            return text, item


def run_concurrently(scheduler, jobs):
    results: dict[int, object] = {}

    def worker(i, prompt_ids, config):
        try:
            results[i] = collect(scheduler, prompt_ids, config)[0]
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [results[i] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def demo_engine(demo_chat):
    assert hasattr(demo_chat.model, "decode_rows"), "the demo model should run on the native batched family"
    return demo_chat.engine


def prompt(demo_chat, question):
    return demo_chat.encode(demo_chat.build_messages(question))


def test_batched_greedy_equals_single_requests(demo_chat, demo_engine):
    config = GenerationConfig(do_sample=False, max_new_tokens=24)
    prompts = [prompt(demo_chat, q) for q in QUESTIONS]
    alone = [demo_engine.generate(p, config).text for p in prompts]
    scheduler = Scheduler(demo_engine, max_active=4, max_queue=8)
    try:
        together = run_concurrently(scheduler, [(p, config) for p in prompts])
    finally:
        scheduler.close()
    assert [t.strip() for t in together] == [a.strip() for a in alone]
    assert "Paris" in together[0]


def test_each_request_keeps_its_own_sampling_settings(demo_chat, demo_engine):
    p = prompt(demo_chat, "Write a line about the sea.")
    seeded = GenerationConfig(temperature=1.0, top_p=0.95, seed=11, max_new_tokens=16)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=16, stop=("the",))
    scheduler = Scheduler(demo_engine, max_active=4)
    try:
        first = run_concurrently(scheduler, [(p, seeded), (p, greedy), (p, seeded.updated(max_new_tokens=4))])
        second = run_concurrently(scheduler, [(p, seeded)])
    finally:
        scheduler.close()
    assert first[0] == second[0], "a seeded request samples the same whatever runs beside it"
    assert "the" not in first[1]
    assert len(demo_chat.tokenizer(first[2], add_special_tokens=False)["input_ids"]) <= 5


def test_cancel_frees_the_slot_and_queue_limit(demo_chat, demo_engine):
    long = GenerationConfig(do_sample=False, max_new_tokens=400)
    p = prompt(demo_chat, "Write a long story about a dragon.")
    scheduler = Scheduler(demo_engine, max_active=1, max_queue=1)
    try:
        inbox: queue.Queue = queue.Queue()
        handle = scheduler.submit(p, long, inbox.put)
        inbox.get(timeout=60)  # it is running
        scheduler.submit(p, long, lambda item: None).cancel()  # a cancelled waiting request leaves the queue
        queued = scheduler.submit(p, long, lambda item: None)
        with pytest.raises(QueueFull):
            scheduler.submit(p, long, lambda item: None)
        queued.cancel()
        handle.cancel()
        start = time.monotonic()
        text, final = collect(scheduler, prompt(demo_chat, "What is the capital of France?"), GenerationConfig(
            do_sample=False, max_new_tokens=12
        ))
        assert "Paris" in text and final.finish_reason in ("stop", "length")
        assert time.monotonic() - start < 60
        assert scheduler.load == (0, 0)
    finally:
        scheduler.close()


def test_bad_request_does_not_kill_the_worker(demo_chat, demo_engine):
    scheduler = Scheduler(demo_engine, max_active=2, max_sequence_length=64)
    try:
        with pytest.raises(GlmkitError, match="context window is 64"):
            collect(scheduler, list(range(100, 200)), GenerationConfig(max_new_tokens=4))
        text, _ = collect(scheduler, prompt(demo_chat, "What is the capital of France?"), GenerationConfig(
            do_sample=False, max_new_tokens=10
        ))
        assert "Paris" in text
    finally:
        scheduler.close()


def test_interleaved_mode_for_models_without_row_decoding(tiny_llama):
    class ByteTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(tiny_llama, ByteTokenizer())
    scheduler = Scheduler(engine, max_active=3)
    assert not scheduler.batched
    config = GenerationConfig(do_sample=False, max_new_tokens=10)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    try:
        together = run_concurrently(scheduler, [(p, config) for p in prompts])
    finally:
        scheduler.close()
    assert together == [engine.generate(p, config).text for p in prompts]


def test_cache_is_sized_at_start_and_never_copied(demo_chat, demo_engine):
    short = GenerationConfig(do_sample=False, max_new_tokens=30)
    longer = GenerationConfig(do_sample=False, max_new_tokens=60)
    first = prompt(demo_chat, "What is the capital of France?")
    second = prompt(demo_chat, "Describe the water cycle in a few sentences. " * 3)
    scheduler = Scheduler(demo_engine, max_active=2, max_sequence_length=512)
    try:
        budget = scheduler.cache_budget_bytes  # known before any request
        assert budget > 0 and scheduler.cache_bytes == 0
        inbox: queue.Queue = queue.Queue()
        scheduler.submit(first, short, inbox.put)
        inbox.get(timeout=60)
        assert scheduler.cache_bytes == budget
        text_second, _ = collect(scheduler, second, longer)  # a longer request beside the first
        assert scheduler.cache_bytes == budget
        text_first = ""
        while True:
            item = inbox.get(timeout=60)
            text_first += item.text
            if item.finish_reason:
                break
    finally:
        scheduler.close()
    assert text_second == demo_engine.generate(second, longer).text
    assert demo_engine.generate(first, short).text.endswith(text_first)


def test_memory_budget_bounds_the_rows(demo_chat, demo_engine):
    row = demo_engine.model.new_cache(1, 256).nbytes
    scheduler = Scheduler(demo_engine, max_active=4, max_sequence_length=256, kv_cache_bytes=2 * row + row // 2)
    config = GenerationConfig(do_sample=False, max_new_tokens=12)
    prompts = [prompt(demo_chat, q) for q in QUESTIONS[:4]]
    try:
        assert scheduler.max_active == 2  # two rows fit; the other requests wait their turn
        together = run_concurrently(scheduler, [(p, config) for p in prompts])
        assert scheduler.cache_bytes == scheduler.cache_budget_bytes == 2 * row
    finally:
        scheduler.close()
    assert together == [demo_engine.generate(p, config).text for p in prompts]
    with pytest.raises(GlmkitError, match="holds no request of 256 tokens"):
        Scheduler(demo_engine, max_sequence_length=256, kv_cache_bytes=row - 1)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(demo_chat, demo_engine):
    running = GenerationConfig(do_sample=False, max_new_tokens=40)
    newcomer = GenerationConfig(do_sample=False, max_new_tokens=8)
    first = prompt(demo_chat, "Count from one to fifty in words.")
    long = prompt(demo_chat, "Summarise the history of the printing press in Europe. " * 4)
    assert len(long) > 64
    scheduler = Scheduler(demo_engine, max_active=2, max_sequence_length=512, prefill_chunk=8)
    events: list[tuple[str, object]] = []
    arrived, ended = threading.Event(), threading.Event()

    def on_first(item):
        events.append(("first", item))
        arrived.set()
        if item is None or isinstance(item, BaseException) or item.finish_reason:
            ended.set()

    try:
        scheduler.submit(first, running, on_first)
        assert arrived.wait(60)
        text_long, _ = collect(scheduler, long, newcomer)
        events.append(("long done", None))
        assert ended.wait(120)
    finally:
        scheduler.close()
    # about len(long) / 8 chunks, each followed by a decode step of the running request
    between = events.index(("long done", None))
    assert sum(1 for name, _ in events[1:between] if name == "first") >= len(long) // 8 - 2
    assert text_long == demo_engine.generate(long, newcomer).text
    text_first = "".join(item.text for name, item in events if name == "first" and item is not None)
    assert text_first == demo_engine.generate(first, running).text


def test_next_turn_reuses_the_rows_keys_and_values(demo_chat, demo_engine):
    config = GenerationConfig(do_sample=False, max_new_tokens=16)
    first = prompt(demo_chat, "What is the capital of France?")
    scheduler = Scheduler(demo_engine, max_active=2, max_sequence_length=512)
    try:
        answer, _ = collect(scheduler, first, config)
        messages = demo_chat.build_messages("And of Germany?", [("What is the capital of France?", answer)])
        second = demo_chat.encode(messages)
        assert second[: len(first)] == first
        text, _ = collect(scheduler, second, config)
        assert scheduler.reused_tokens >= len(first)  # the first turn's prompt was not prefilled again
    finally:
        scheduler.close()
    assert text == demo_engine.generate(second, config).text


def test_a_kept_row_loses_what_a_shorter_window_overwrites(demo_chat, demo_engine):
    config = GenerationConfig(do_sample=False, max_new_tokens=4)
    long = prompt(demo_chat, "Tell me about the history of bread baking in Europe. " * 30)
    assert 300 < len(long) < 500  # its row's request fills a 512 window
    scheduler = Scheduler(demo_engine, max_active=2, max_sequence_length=600)
    try:
        collect(scheduler, long, config)  # row 0 keeps the long prompt
        short = prompt(demo_chat, "Hi")  # a row of its own; steps of a 256 window pass over row 0
        collect(scheduler, short, GenerationConfig(do_sample=False, max_new_tokens=8))
        before = scheduler.reused_tokens
        again = long[:-3] + prompt(demo_chat, "Bye")[-3:]
        text, _ = collect(scheduler, again, config)
        assert 0 < scheduler.reused_tokens - before <= 255  # only what the short window left whole
    finally:
        scheduler.close()
    assert text == demo_engine.generate(again, config).text


def test_prompts_arriving_together_are_prefilled_together(demo_chat, demo_engine):
    config = GenerationConfig(do_sample=False, max_new_tokens=12)
    prompts = [prompt(demo_chat, q) for q in ("Hi", "Why is the sky blue, and why are sunsets red?", "2+2")]
    assert len(set(map(len, prompts))) == 3  # padded on the right to the longest of them
    long = prompt(demo_chat, "Summarise the history of the printing press in Europe. " * 8)
    chunk = 2 * max(map(len, prompts)) + 1  # two of the short prompts fit in a chunk, the long one does not
    assert len(long) > chunk
    jobs = [*prompts, long]
    alone = [demo_engine.generate(p, config).text for p in jobs]
    scheduler = Scheduler(demo_engine, max_active=6, max_sequence_length=512, prefill_chunk=chunk)
    try:
        running: queue.Queue = queue.Queue()
        scheduler.submit(prompt(demo_chat, "Count from one to fifty in words."), config.updated(max_new_tokens=80),
                         running.put)  # fmt: skip
        running.get(timeout=60)  # decoding now: the next prompts arrive between two of its steps
        inboxes = [queue.Queue() for _ in jobs]
        for p, inbox in zip(jobs, inboxes, strict=True):
            scheduler.submit(p, config, inbox.put)
        together = []
        for inbox in inboxes:
            text = ""
            while not (item := inbox.get(timeout=120)).finish_reason:
                text += item.text
            together.append(text + item.text)
    finally:
        scheduler.close()
    assert together == alone
    assert scheduler.prompts_prefilled_together >= 2
