"""ChatGLM2/3-6B (and CharacterGLM) decode concurrent requests as one batch: ``decode_rows``.

Data: the tiny random ChatGLM3 checkpoint of ``../shared/conformance/chatglm_v3``.
"""

from __future__ import annotations

import queue

import pytest
import torch
from conftest import V3_DIR, needs_conformance
from safetensors.torch import save_file

from glmkit.engine import Engine, GenerationConfig
from glmkit.engine.scheduler import Scheduler
from glmkit.models import load_model, load_tokenizer
from glmkit.templates import get_template

pytestmark = needs_conformance

# fp32: the logits of the tiny random model reach ~35, and a cached decode differs from recomputing the
# whole sequence by up to ~5e-5 (summation order), for the one-sequence cached path as for decode_rows
TOLERANCE = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(scope="module")
def model():
    return load_model(V3_DIR / "checkpoint")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The same network with a random P-Tuning v2 prefix of 3 positions."""
    directory = tmp_path_factory.mktemp("ptuning")
    kv_size = 2 * 2 * 2 * 16  # layers * (key, value) * kv_heads * head_dim of the tiny model
    weight = torch.randn(3, kv_size, generator=torch.Generator().manual_seed(0))
    save_file({"transformer.prefix_encoder.embedding.weight": weight}, str(directory / "model.safetensors"))
    return load_model(V3_DIR / "checkpoint", ptuning_checkpoint=directory)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits recomputed over the whole sequence, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def check_rows_against_recomputation(model):
    generator = torch.Generator().manual_seed(1)
    cache = model.new_cache(4, 40)
    for tensor in [*cache.keys, *cache.values]:  # stale data everywhere: only the mask may keep it out
        tensor.normal_(generator=generator)
    sequences = {0: 5, 2: 11, 3: 2}  # row -> prompt length; row 1 stays unused
    tokens = {row: torch.randint(3, 60000, (n,), generator=generator).tolist() for row, n in sequences.items()}
    with torch.inference_mode():
        for row, ids in tokens.items():
            model(torch.tensor([ids]), cache=cache.row(row), last_only=True)
        for step in range(4):
            # a different subset and order of rows at each step: rows decode independently
            rows = [3, 0, 2] if step % 2 == 0 else [2, 3]
            new = torch.randint(3, 60000, (len(rows), 1), generator=generator)
            logits = model.decode_rows(new, cache, torch.tensor(rows), torch.tensor([len(tokens[row]) for row in rows]))
            assert logits.shape == (len(rows), model.config.padded_vocab_size)
            for i, row in enumerate(rows):
                tokens[row].append(int(new[i, 0]))
                assert torch.allclose(logits[i], full_logits(model, tokens[row]), **TOLERANCE), (step, row)


def test_decode_rows_equals_full_recomputation(model):
    check_rows_against_recomputation(model)


def test_decode_rows_with_ptuning_prefix(model, tuned):
    check_rows_against_recomputation(tuned)
    ids = [64790, 64792, 30910, 13]
    assert not torch.allclose(full_logits(tuned, ids), full_logits(model, ids), atol=1e-2)


def chatglm3_engine(network) -> tuple[Engine, object, object]:
    tokenizer = load_tokenizer(V3_DIR / "tokenizer")
    template = get_template("chatglm3")
    return Engine(network, tokenizer, stop_token_ids=template.stop_token_ids(tokenizer)), tokenizer, template


def run_together(scheduler: Scheduler, prompts: list[list[int]], configs: list) -> list[tuple[str, list[int]]]:
    """Every request submitted at once to a batched scheduler; (text, ids) of each, in order."""
    assert scheduler.batched
    try:
        inboxes = [queue.Queue() for _ in prompts]
        for p, c, inbox in zip(prompts, configs, inboxes, strict=True):
            scheduler.submit(p, c, inbox.put)
        return [collect(inbox) for inbox in inboxes]
    finally:
        scheduler.close()


def collect(inbox: queue.Queue, timeout: float = 60) -> tuple[str, list[int]]:
    text, token_ids = "", []
    while True:
        item = inbox.get(timeout=timeout)
        if item is None:
            raise AssertionError("stream ended without a final chunk")
        if isinstance(item, BaseException):
            raise item
        text += item.text
        token_ids += item.token_ids
        if item.finish_reason:
            return text, token_ids


@pytest.mark.parametrize("which", ["plain", "ptuning"])
def test_scheduler_batches_chatglm3_like_single_requests(model, tuned, which):
    engine, tokenizer, template = chatglm3_engine(model if which == "plain" else tuned)
    questions = ["Hi", "What is the capital of France?", "Tell me a story about a dragon and a knight, please.", "2+2"]
    prompts = [template.build_input_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    prompts.append(prompts[2][:7])
    # budgets that differ, so rows finish at different steps and a queued request reuses a freed row
    configs = [GenerationConfig(do_sample=False, max_new_tokens=n) for n in (12, 20, 6, 16, 10)]
    alone = [engine.generate(p, c) for p, c in zip(prompts, configs, strict=True)]

    together = run_together(Scheduler(engine, max_active=3, max_queue=8), prompts, configs)
    assert [ids for _, ids in together] == [r.token_ids for r in alone]
    assert [text for text, _ in together] == [r.text for r in alone]
    assert any(len(r.token_ids) > 1 for r in alone)


@pytest.mark.parametrize("which", ["plain", "ptuning"])
def test_prompts_arriving_together_are_prefilled_together(model, tuned, which):
    engine, tokenizer, template = chatglm3_engine(model if which == "plain" else tuned)
    questions = ["Hi", "Tell me a long story about a dragon, a knight, a castle and a river, please.", "2+2",
                 "What is the capital of France?"]  # fmt: skip
    prompts = [template.build_input_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    assert max(map(len, prompts)) > 3 * min(map(len, prompts))  # padded on the right to the longest
    config = GenerationConfig(do_sample=False, max_new_tokens=10)
    alone = [engine.generate(p, config).token_ids for p in prompts]
    scheduler = Scheduler(engine, max_active=6)
    try:
        running: queue.Queue = queue.Queue()
        scheduler.submit(prompts[1], GenerationConfig(do_sample=False, max_new_tokens=200), running.put)
        running.get(timeout=60)  # decoding now: the next prompts arrive between two of its steps
        inboxes = [queue.Queue() for _ in prompts]
        for p, inbox in zip(prompts, inboxes, strict=True):
            scheduler.submit(p, config, inbox.put)
        together = [collect(inbox)[1] for inbox in inboxes]
        # and the rows they leave serve a prompt that extends one of them
        longer = prompts[3] + together[3]
        inbox = queue.Queue()
        scheduler.submit(longer, config, inbox.put)
        extended = collect(inbox)[1]
    finally:
        scheduler.close()
    assert together == alone
    assert scheduler.prompts_prefilled_together >= 2
    assert scheduler.reused_tokens >= len(prompts[3])
    assert extended == engine.generate(longer, config).token_ids


@pytest.mark.parametrize("which", ["plain", "ptuning"])
def test_a_prompt_that_extends_a_finished_one_reuses_its_row(model, tuned, which):
    engine, tokenizer, template = chatglm3_engine(model if which == "plain" else tuned)
    first = template.build_input_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    longer = template.build_input_ids(
        tokenizer,
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Germany?"}],
    )  # fmt: skip
    assert longer[: len(first) - 1] == first[:-1]
    config = GenerationConfig(do_sample=False, max_new_tokens=8)
    scheduler = Scheduler(engine, max_active=2)
    try:
        inbox: queue.Queue = queue.Queue()
        scheduler.submit(first, config, inbox.put)
        collect(inbox)
        scheduler.submit(longer, config, inbox.put)
        _, ids = collect(inbox)
        assert scheduler.reused_tokens >= len(first) - 1
    finally:
        scheduler.close()
    assert ids == engine.generate(longer, config).token_ids


def test_scheduler_batches_chatglm_6b_like_single_requests():
    from conftest import V1_DIR

    tokenizer = load_tokenizer(V1_DIR / "tokenizer")
    template = get_template("chatglm")
    engine = Engine(load_model(V1_DIR / "checkpoint"), tokenizer, stop_token_ids=template.stop_token_ids(tokenizer))
    questions = ["你好", "What is the capital of France?", "Tell me a story about a dragon and a knight.", "2+2"]
    prompts = [template.build_input_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    configs = [GenerationConfig(do_sample=False, max_new_tokens=n) for n in (12, 20, 6, 16)]
    alone = [engine.generate(p, c) for p, c in zip(prompts, configs, strict=True)]
    scheduler = Scheduler(engine, max_active=3, max_queue=8, prefill_chunk=4)  # the prompts are never cut
    together = run_together(scheduler, prompts, configs)
    assert [ids for _, ids in together] == [r.token_ids for r in alone]
    assert any(len(r.token_ids) > 1 for r in alone)
