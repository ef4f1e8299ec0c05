"""The decode loop, sampling and stop rules on a tiny random model and the demo tokenizer."""

from __future__ import annotations

import pytest
import torch

from glmkit.engine import DecodeSession, GenerationConfig, generate_tokens
from glmkit.engine.config import token_budget
from glmkit.engine.detokenizer import StreamingDetokenizer
from glmkit.engine.sampling import Sampler, filter_top_k_top_p, uniform_from_bits
from glmkit.engine.stop_strings import StopStringMatcher
from glmkit.errors import GlmkitError

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False)
PROMPT = [5, 17, 33, 2, 71, 9]


def test_cache_matches_full_recomputation(tiny_llama):
    assert generate_tokens(tiny_llama, PROMPT, GREEDY, use_cache=True) == generate_tokens(
        tiny_llama, PROMPT, GREEDY, use_cache=False
    )


def test_session_reuses_cache_without_changing_output(tiny_llama):
    session = DecodeSession()
    from glmkit.engine import iter_tokens

    first = list(iter_tokens(tiny_llama, PROMPT, GREEDY, session=session))
    assert session.tokens == PROMPT + first[:-1]
    follow_up = PROMPT + first + [11, 12]
    reused = list(iter_tokens(tiny_llama, follow_up, GREEDY, session=session))
    assert reused == generate_tokens(tiny_llama, follow_up, GREEDY)
    # a prompt that diverges early is recomputed from the shared prefix
    other = [5, 40, 41]
    assert list(iter_tokens(tiny_llama, other, GREEDY, session=session)) == generate_tokens(tiny_llama, other, GREEDY)


def test_seeded_sampling_is_reproducible(tiny_llama):
    config = GenerationConfig(max_new_tokens=16, temperature=1.5, top_p=1.0, seed=1234)
    a = generate_tokens(tiny_llama, PROMPT, config)
    assert a == generate_tokens(tiny_llama, PROMPT, config)
    others = {tuple(generate_tokens(tiny_llama, PROMPT, config.updated(seed=s))) for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"


def test_temperature_zero_is_greedy(tiny_llama):
    assert generate_tokens(tiny_llama, PROMPT, GenerationConfig(max_new_tokens=12, temperature=0)) == (
        generate_tokens(tiny_llama, PROMPT, GREEDY)
    )


def test_stop_token_and_budget(tiny_llama):
    tokens = generate_tokens(tiny_llama, PROMPT, GREEDY)
    assert len(tokens) == 12
    stop = tokens[3]
    cut = generate_tokens(tiny_llama, PROMPT, GREEDY, stop_token_ids=[stop])
    assert cut == tokens[: tokens.index(stop) + 1]
    assert len(generate_tokens(tiny_llama, PROMPT, GREEDY.updated(max_length=len(PROMPT) + 5))) == 5


def test_budget_errors():
    with pytest.raises(GlmkitError, match="context window is 8"):
        token_budget(8, GenerationConfig(), 8)
    with pytest.raises(GlmkitError, match="max_length 4"):
        token_budget(5, GenerationConfig(max_length=4), 100)
    assert token_budget(5, GenerationConfig(max_new_tokens=None), 100) == 95
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"repetition_penalty": 0}):
        with pytest.raises(GlmkitError):
            GenerationConfig(**bad)


def test_top_k_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    probs = logits.softmax(-1)[0]
    top_k = torch.tensor([2, 0, 0])
    top_p = torch.tensor([float("inf"), float(probs[0] + probs[1] / 2), 1e-6])
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_k, top_p))
    assert kept.tolist() == [[True, True, False, False, False], [True, True, False, False, False], [True] + [False] * 4]


def test_gumbel_noise_is_always_finite():
    """The largest hash once made the noise +inf, so a token far below the others won a draw."""
    extremes = uniform_from_bits(torch.tensor([0, 0x100, 0xFFFFFE00, 0xFFFFFFFF]))
    assert (extremes > 0).all() and (extremes < 1).all()
    assert torch.unique(extremes).numel() == 4  # the largest stays above the one below it
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 2.1, -1.0]])
    config = GenerationConfig(do_sample=False, repetition_penalty=2.0)
    for penalty, expected in ((2.0, 0), (1.0, 1)):
        sampler = Sampler(1, "cpu")
        sampler.assign(0, config.updated(repetition_penalty=penalty), [1])
        assert sampler.sample(logits, slice(0, 1)).item() == expected


def test_stop_string_matcher_holds_back_partial_matches():
    matcher = StopStringMatcher(("</end>", "STOP"))
    assert matcher.feed("hello <") == ("hello ", False)
    assert matcher.feed("/en") == ("", False)
    assert matcher.feed("x more") == ("</enx more", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.feed("OP and after") == ("", True)
    assert StopStringMatcher(("ab",)).feed("xa") == ("x", False)


@pytest.mark.parametrize("text", ["你好，世界！今天天气很好。", "emoji 😀👍🏽 and 🇫🇷 flags", "混合 mixed 文本 ✨ end"])
def test_streaming_detokenizer_never_breaks_characters(demo_chat, text):
    tokenizer = demo_chat.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the case should split a character"
    detokenizer = StreamingDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids]
    pieces.append(detokenizer.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_session_survives_an_early_close_but_not_an_interrupted_step(tiny_llama):
    from glmkit.engine import iter_tokens

    session = DecodeSession()
    tokens = iter_tokens(tiny_llama, PROMPT, GREEDY, session=session)
    next(tokens)
    tokens.close()  # a reader that stopped (a reply ended by a stop string, a client that left)
    assert session.cache is not None and session.tokens == PROMPT

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    tokens = iter_tokens(tiny_llama, [*PROMPT, 1, 2], GREEDY, session=session)
    original, tiny_llama.forward = tiny_llama.forward, interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            next(tokens)
    finally:
        tiny_llama.forward = original
    assert session.cache is None and session.tokens == []


def test_ctrl_c_while_the_session_cache_grows_leaves_no_half_grown_cache(monkeypatch):
    """Ctrl-C in the REPL can land while a reused cache is being lengthened for the next turn."""
    from glmkit.models.base import KVCache

    cache = KVCache.allocate(3, 1, 2, 8, 4, torch.float32, "cpu")
    calls = {"n": 0}
    real_zeros = torch.Tensor.new_zeros

    def zeros_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after some layers are grown
            raise KeyboardInterrupt
        return real_zeros(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", zeros_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.grow(16)
    monkeypatch.undo()
    assert {t.shape[2] for t in (*cache.keys, *cache.values)} == {8}, "every layer keeps the old size"


def test_an_interrupted_cache_preparation_resets_the_session(tiny_llama, monkeypatch):
    from glmkit.engine import generate as generate_module
    from glmkit.engine import iter_tokens

    session = DecodeSession()
    tokens = iter_tokens(tiny_llama, PROMPT, GREEDY, session=session)
    next(tokens)
    tokens.close()
    assert session.cache is not None

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "_prepare_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        next(iter_tokens(tiny_llama, [*PROMPT, 1, 2], GREEDY, session=session))
    assert session.cache is None and session.tokens == []
