"""The engine's static decode step (``engine/step.py``) and the batched sampler (``engine/sampling.py``).

The step attends over the whole fixed-capacity cache with a mask and keeps tokens and positions on the
device; it must give the tokens of the plain per-token forward.  Data: random tiny native models and
the ChatGLM3 conformance checkpoint of ``../shared/conformance/chatglm_v3``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import V3_DIR, needs_conformance

from glmkit.engine import GenerationConfig, generate_tokens
from glmkit.engine.sampling import Sampler
from glmkit.engine.step import DecodeStep, bucket
from glmkit.models import load_model
from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmkit.models.llama import LlamaConfig, LlamaForCausalLM
from glmkit.models.quantize import quantize_model

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=24)
PROMPT = [64790, 64792, 30910, 13, 4, 900, 77, 12]


def tiny_chatglm2(multi_query: bool = True) -> ChatGLM2ForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLM2Config(
        padded_vocab_size=65024, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
        multi_query_attention=multi_query, multi_query_group_num=2, ffn_hidden_size=96, seq_length=128,
    )  # fmt: skip
    model = ChatGLM2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than the default init, so that greedy tokens move around
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=70000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make", [tiny_chatglm2, lambda: tiny_chatglm2(False), tiny_llama], ids=["mqa", "mha", "llama"])
def test_static_step_gives_the_tokens_of_full_recomputation(make):
    model = make()
    fast = generate_tokens(model, PROMPT, GREEDY)
    assert fast == generate_tokens(model, PROMPT, GREEDY, use_cache=False)
    assert len(set(fast)) > 3


@needs_conformance
def test_static_step_on_the_conformance_model():
    model = load_model(V3_DIR / "checkpoint")
    ids = [64790, 64792, 30910, 13, 4, 900]
    assert generate_tokens(model, ids, GREEDY) == generate_tokens(model, ids, GREEDY, use_cache=False)


def test_rows_of_a_step_decode_independently():
    """Rows at different positions, with idle rows between them, give each row's own logits."""
    model = tiny_chatglm2()
    cache = model.new_cache(4, 40)
    for t in (*cache.keys, *cache.values):
        t.normal_()  # stale data everywhere: only the mask keeps it out
    prompts = {0: PROMPT[:5], 2: [*PROMPT, 5, 6]}
    step = DecodeStep(model, cache, mode="eager")
    with torch.inference_mode():
        for row, ids in prompts.items():
            model(torch.tensor([ids]), cache=cache.row(row), last_only=True)
            step.place(row, 100 + row, len(ids))
        step.place(1, 0, 39)
        for _ in range(3):
            logits = step.run(3)
            for row, ids in prompts.items():
                ids.append(int(step.tokens[row, 0]))
                expected = model(torch.tensor([ids])).logits[0, -1]
                torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-5)
            step.feed(logits.argmax(-1))
    assert step.positions[:3].tolist() == [8, 39, 13]  # the idle row 1 stays at the last index


def compiled_tokens(monkeypatch, model) -> list[int]:
    """Greedy tokens through the compiled step on the CPU (skipped where inductor cannot compile)."""
    pytest.importorskip("torch._inductor")
    monkeypatch.setenv("GLMKIT_DECODE", "compiled")
    try:
        return generate_tokens(model, PROMPT, GREEDY)
    except Exception as exc:  # no C++ compiler for inductor here
        pytest.skip(f"torch.compile does not run on this CPU: {exc!r:.200}")


def test_compiled_step_on_cpu_gives_the_eager_tokens(monkeypatch):
    model = tiny_llama()
    eager = generate_tokens(model, PROMPT, GREEDY)
    assert compiled_tokens(monkeypatch, model) == eager


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_step_over_quantized_linears_gives_the_eager_tokens(monkeypatch, bits):
    """The INT8 / INT4 CPU kernels inside the compiled step (on CUDA the same step is also graphed)."""
    model = quantize_model(tiny_chatglm2(), bits)
    eager = generate_tokens(model, PROMPT, GREEDY)
    assert compiled_tokens(monkeypatch, model) == eager and len(set(eager)) > 3


def test_buckets():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 9, 33, 64)] == [2, 2, 4, 8, 16, 64, 64]
    assert bucket(1, 1) == 1 and bucket(5, 6) == 6 and bucket(70, 80) == 80


SETTINGS = [
    GenerationConfig(temperature=1.0, top_p=1.0, seed=1),
    GenerationConfig(temperature=0.7, top_p=0.8, seed=2**64 - 1),
    GenerationConfig(do_sample=False, repetition_penalty=1.3),
    GenerationConfig(temperature=1.3, top_p=1.0, top_k=5, repetition_penalty=1.2, seed=7),
]


def test_batched_draws_reproduce_single_request_draws():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 50, generator=generator)  # [steps, rows, vocab]
    together = Sampler(4, "cpu")
    alone = [Sampler(1, "cpu") for _ in SETTINGS]
    for row, config in enumerate(SETTINGS):
        together.assign(row, config, [3, 4])
        alone[row].assign(0, config, [3, 4])
    batch_tokens, single_tokens = [], []
    for step in range(6):
        batch_tokens.append(together.sample(logits[step], slice(0, 4)).tolist())
        single_tokens.append([int(alone[row].sample(logits[step, row : row + 1], slice(0, 1))) for row in range(4)])
    assert batch_tokens == single_tokens
    assert len({tuple(column) for column in zip(*batch_tokens, strict=True)}) == 4


def test_a_row_range_samples_like_the_whole_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    whole, part = Sampler(4, "cpu"), Sampler(4, "cpu")
    for row, config in enumerate(SETTINGS):
        whole.assign(row, config, [])
        part.assign(row, config, [])
    assert whole.sample(logits, slice(0, 4))[1:3].tolist() == part.sample(logits[1:3], slice(1, 3)).tolist()


def test_draws_follow_the_softmax():
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(rows, 4)
    sampler = Sampler(rows, "cpu")
    config = GenerationConfig(temperature=1.0, top_p=1.0)
    for row in range(rows):
        sampler.assign(row, config.updated(seed=row), [])
    counts = torch.bincount(sampler.sample(logits, slice(0, rows)), minlength=4) / rows
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.015), counts


def test_top_k_and_top_p_limit_the_draws():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0, -1.0]]).expand(3000, 5)
    for config, allowed in (
        (GenerationConfig(temperature=1.0, top_p=1.0, top_k=2), {0, 1}),
        (GenerationConfig(temperature=1.0, top_p=0.5), {0, 1}),
    ):
        sampler = Sampler(3000, "cpu")
        for row in range(3000):
            sampler.assign(row, config.updated(seed=row), [])
        assert set(sampler.sample(logits, slice(0, 3000)).tolist()) == allowed
