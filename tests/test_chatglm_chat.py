"""ChatGLM checkpoints in the official directory layout, through ``glmkit.load`` and ``chat``."""

from __future__ import annotations

import json

import pytest
from conftest import CONFORMANCE, load_expected, needs_conformance

import glmkit
from glmkit.models import read_config
from glmkit.templates import detect_template

pytestmark = needs_conformance


def official_dir(tmp_path_factory, version: str):
    """Checkpoint and tokenizer files side by side, as the hub repos ship them."""
    folder = tmp_path_factory.mktemp(version)
    for part in ("checkpoint", "tokenizer"):
        for f in (CONFORMANCE / version / part).iterdir():
            (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    return official_dir(tmp_path_factory, "chatglm_v1")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return official_dir(tmp_path_factory, "chatglm_v3")


def expected(version):
    return load_expected(CONFORMANCE / version)


def test_templates_are_detected(v1, v3):
    assert detect_template(v1, read_config(v1)) == "chatglm"
    assert detect_template(v3, read_config(v3)) == "chatglm3"


def test_v1_chat_matches_reference(v1):
    model = glmkit.load(v1, device="cpu", dtype="fp32")
    for case in expected("chatglm_v1")["chat"]:
        history = [tuple(pair) for pair in case["history"]]
        response, new_history = model.chat(case["query"], history, temperature=0, max_new_tokens=20)
        assert response == case["response"]
        assert [list(p) for p in new_history] == case["new_history"]
        streamed = list(model.stream_chat(case["query"], history, temperature=0, max_new_tokens=20))
        assert streamed[-1][0] == response


def test_v3_chat_matches_reference(v3):
    model = glmkit.load(v3, device="cpu", dtype="fp32")
    for case in expected("chatglm_v3")["chat"]:
        # the reference generates 20 tokens and drops the last one before decoding
        response, new_history = model.chat(case["query"], case["history"], temperature=0, max_new_tokens=19)
        assert response == case["response"]
        assert new_history == case["new_history"]


def test_v3_cache_reuse_across_turns_changes_nothing(v3):
    model = glmkit.load(v3, device="cpu", dtype="fp32")
    _, history = model.chat("你好", [], temperature=0, max_new_tokens=8)
    cache = model._session.cache
    assert cache is not None, "the first turn's cache should be kept"
    second, _ = model.chat("hi", history, temperature=0, max_new_tokens=8)
    assert model._session.cache is cache, "the second turn should extend the first turn's cache"
    fresh = glmkit.load(v3, device="cpu", dtype="fp32")
    assert fresh.chat("hi", history, temperature=0, max_new_tokens=8)[0] == second


def test_v3_observation_role(v3):
    model = glmkit.load(v3, device="cpu", dtype="fp32")
    history = [{"role": "user", "content": "weather?"}, {"role": "assistant", "metadata": "get_weather",
               "content": {"name": "get_weather", "parameters": {"city": "Beijing"}}}]  # fmt: skip
    messages = model.build_messages('{"temperature": 22}', history, role="observation")
    ids = model.encode(messages)
    assert model.tokenizer.convert_tokens_to_ids("<|observation|>") in ids
    _, new_history = model.chat('{"temperature": 22}', history, role="observation", temperature=0,
                                max_new_tokens=4)  # fmt: skip
    assert new_history[-2] == {"role": "observation", "content": '{"temperature": 22}'}


def test_character_card_in_the_terminal(v3, tmp_path):
    import sys

    import pexpect

    card = {"bot_name": "苏梦远", "user_name": "小明", "bot_info": "一位画家", "user_info": "学生",
            "greeting": "你好呀！"}  # fmt: skip
    (tmp_path / "card.json").write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "glmkit", "chat", "--model", str(v3), "--character", str(tmp_path / "card.json"),
         "--temperature", "0", "--max-new-tokens", "6"],
        encoding="utf-8",
        timeout=120,
    )  # fmt: skip
    child.expect("苏梦远: 你好呀！")
    child.expect("You: ")
    child.sendline("今天画什么？")
    child.expect("苏梦远: ")
    child.expect("You: ")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    (tmp_path / "bad.json").write_text('{"bot_name": "x"}')
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "glmkit", "chat", "--model", str(v3), "--character", str(tmp_path / "bad.json"),
         "-q", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "user_name" in result.stderr and "Traceback" not in result.stderr


def test_characterglm_samples_as_its_official_chat(v3, tmp_path):
    """temperature 0.9, top-p 0.9, top-k 100, repetition penalty 1.3, a newline ends the turn; values
    the checkpoint's generation_config.json names still win."""
    model = glmkit.load(v3, device="cpu", dtype="fp32", template="characterglm")
    config = model.generation_config
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.9, 0.9, 100, 1.3)
    assert model.tokenizer.convert_tokens_to_ids("<0x0A>") in model.engine.stop_token_ids
    other = glmkit.load(v3, device="cpu", dtype="fp32")  # the ChatGLM3 template keeps glmkit's defaults
    assert (other.generation_config.top_k, other.generation_config.repetition_penalty) == (0, 1.0)
    own = tmp_path / "own"
    own.mkdir()
    for f in v3.iterdir():
        if f.name != "generation_config.json":
            (own / f.name).symlink_to(f.resolve())
    (own / "generation_config.json").write_text('{"temperature": 0.5}', encoding="utf-8")
    tuned = glmkit.load(own, device="cpu", dtype="fp32", template="characterglm").generation_config
    assert (tuned.temperature, tuned.top_k) == (0.5, 100)
