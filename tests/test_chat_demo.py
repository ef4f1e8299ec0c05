"""Chat through the Python API on the bundled demo model (real text end to end)."""

from __future__ import annotations

import pytest

from glmkit.errors import GlmkitError

FRANCE = "What is the capital of France?"


def test_greedy_answer_is_paris(demo_chat):
    response, history = demo_chat.chat(FRANCE, history=[], temperature=0)
    assert "Paris" in response
    assert history == [(FRANCE, response)]


def test_chat_equals_concatenated_stream_pieces(demo_chat):
    config = demo_chat.generation(temperature=0, max_new_tokens=48)
    messages = demo_chat.build_messages("Name three colours of the rainbow.")
    pieces = [chunk.text for chunk in demo_chat.stream_messages(messages, config)]
    response, _ = demo_chat.chat("Name three colours of the rainbow.", temperature=0, max_new_tokens=48)
    assert len([p for p in pieces if p]) > 3, "the reply should arrive in several pieces"
    assert "".join(pieces).strip() == response
    streamed = list(demo_chat.stream_chat("Name three colours of the rainbow.", temperature=0, max_new_tokens=48))
    assert streamed[-1][0] == response
    assert all(streamed[i + 1][0].startswith(streamed[i][0]) for i in range(len(streamed) - 1))


def test_history_follows_the_chat_template(demo_chat):
    first, history = demo_chat.chat(FRANCE, temperature=0)
    messages = demo_chat.build_messages("And of Germany?", history)
    prompt = demo_chat.tokenizer.decode(demo_chat.encode(messages))
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{FRANCE}<|im_end|>\n"
        f"<|im_start|>assistant\n{first}<|im_end|>\n"
        "<|im_start|>user\nAnd of Germany?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    second, history = demo_chat.chat("And of Germany?", history, temperature=0)
    assert "Berlin" in second
    assert [q for q, _ in history] == [FRANCE, "And of Germany?"]


def test_message_history_and_system_prompt(demo_chat):
    history = [{"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris."}]
    response, new_history = demo_chat.chat("And of Italy?", history, system="Answer in one word.", temperature=0)
    assert new_history[0] == {"role": "system", "content": "Answer in one word."}
    assert new_history[-1] == {"role": "assistant", "content": response}
    assert "Rome" in response


def test_seeded_sampling_reproducible_on_demo(demo_chat):
    options = {"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_new_tokens": 24}
    a, _ = demo_chat.chat("Write a line about the sea.", **options)
    b, _ = demo_chat.chat("Write a line about the sea.", **options)
    assert a == b


def test_stop_strings_cut_the_reply(demo_chat):
    full, _ = demo_chat.chat("Count from 1 to 10, separated by commas.", temperature=0, max_new_tokens=40)
    assert "5" in full and "7" in full
    cut, _ = demo_chat.chat("Count from 1 to 10, separated by commas.", temperature=0, stop=["5"], max_new_tokens=40)
    assert cut == full[: full.index("5")].strip()
    messages = demo_chat.build_messages("Count from 1 to 10, separated by commas.")
    chunks = list(demo_chat.stream_messages(messages, demo_chat.generation(temperature=0, stop=("5",))))
    assert "5" not in "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"


def test_length_finish_reason(demo_chat):
    messages = demo_chat.build_messages("Tell me a long story about a dragon.")
    chunks = list(demo_chat.stream_messages(messages, demo_chat.generation(temperature=0, max_new_tokens=5)))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 5


@pytest.mark.parametrize("history", [["just a string"], [("q",)], [{"role": "wizard", "content": "x"}]])
def test_bad_history_is_a_clear_error(demo_chat, history):
    with pytest.raises(GlmkitError, match="history"):
        demo_chat.chat("hi", history)


def test_prompt_longer_than_context_is_a_clear_error(demo_chat):
    with pytest.raises(GlmkitError, match="context window"):
        demo_chat.chat("word " * 9000)


def test_the_readmes_stream_chat_example_prints_the_reply_once(demo_chat, capsys):
    """README's loop over stream_chat prints only what is new at each step: the reply, once."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index('shown = ""\nfor response, history in chat.stream_chat(')
    snippet = readme[start : readme.index("print()\n", start) + len("print()\n")]
    scope = {"chat": demo_chat, "history": []}
    exec(snippet, scope)  # the documented code, as a user pastes it
    printed = capsys.readouterr().out
    assert printed == scope["response"] + "\n" and scope["response"]
