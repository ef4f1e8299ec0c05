"""ChatGLM prompt templates, reply post-processing and template detection.

Prompts, ids and post-processing are checked against what the official THUDM code recorded in the
conformance data; CharacterGLM, tool-call safety and detection need no data.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import V1_DIR, V3_DIR, load_expected, needs_conformance

from glmkit.errors import GlmkitError
from glmkit.templates.characterglm import TEMPLATE as CHARACTERGLM
from glmkit.templates.chatglm import TEMPLATE as CHATGLM
from glmkit.templates.chatglm2 import TEMPLATE as CHATGLM2
from glmkit.templates.chatglm3 import TEMPLATE as CHATGLM3
from glmkit.templates.chatglm3 import build_single_message, parse_tool_call
from glmkit.templates.chatglm_detect import detect_chatglm_template

V1 = load_expected(V1_DIR)
V3 = load_expected(V3_DIR)
V2 = V3.get("chatglm2_6b", {})


def _messages(history: list, query: str) -> list[dict]:
    """Messages from a reference history ((query, response) pairs or message dicts) and a query."""
    messages = []
    for item in history:
        if isinstance(item, dict):
            messages.append(item)
        else:
            messages += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
    return [*messages, {"role": "user", "content": query}]


def _generated(expected: dict, prompt_ids: list[int]) -> list[int] | None:
    """The greedy tokens the reference generated after ``prompt_ids`` (from the forward cases), if any."""
    for case in expected["cases"]:
        if case["input_ids"] == [prompt_ids] and case.get("greedy_generate"):
            return case["greedy_generate"]["new_tokens"][0]
    return None


def _with_generation(expected: dict) -> list[dict]:
    """The recorded chats whose prompt also has a recorded greedy generation."""
    return [
        chat
        for chat in expected.get("chat", [])
        if _generated(expected, chat.get("prompt_input_ids") or chat.get("build_chat_input_ids")) is not None
    ]


# -- ChatGLM-6B ----------------------------------------------------------------------------------


@needs_conformance
@pytest.mark.parametrize("chat", V1.get("chat", []), ids=lambda c: f"{len(c['history'])}-rounds")
def test_v1_chat_prompt(v1, chat):
    messages = _messages(chat["history"], chat["query"])
    assert CHATGLM.build_prompt(messages) == chat["prompt"]
    assert CHATGLM.build_input_ids(v1, messages) == chat["prompt_input_ids"]


@needs_conformance
@pytest.mark.parametrize("chat", _with_generation(V1), ids=lambda c: f"{len(c['history'])}-rounds")
def test_v1_chat_response(v1, chat):
    messages = _messages(chat["history"], chat["query"])
    # the reference chat(): decode what the model generated, then process_response
    response, new = CHATGLM.postprocess(v1.decode(_generated(V1, chat["prompt_input_ids"])), messages)
    assert response == chat["response"]
    assert [*chat["history"], [chat["query"], response]] == chat["new_history"]
    assert new == [{"role": "assistant", "content": response}]


@needs_conformance
@pytest.mark.parametrize("pair", V1.get("process_response", []), ids=lambda p: repr(p["input"]))
def test_v1_process_response(pair):
    assert CHATGLM.postprocess(pair["input"], [])[0] == pair["output"]


@needs_conformance
def test_v1_stops_at_eop(v1):
    assert CHATGLM.stop_token_ids(v1) == [130005]


# -- ChatGLM2-6B ---------------------------------------------------------------------------------


@needs_conformance
@pytest.mark.parametrize("chat", V2.get("chat", []), ids=lambda c: f"{len(c['history'])}-rounds")
@pytest.mark.parametrize("tokenizer", ["v2", "v3"])
def test_v2_chat_prompt(request, tokenizer, chat):
    tok = request.getfixturevalue(tokenizer)  # plain-text prompt: same ids with or without role tokens
    messages = _messages(chat["history"], chat["query"])
    assert CHATGLM2.build_prompt(messages) == chat["build_prompt"]
    assert CHATGLM2.build_input_ids(tok, messages) == chat["prompt_input_ids"]
    assert CHATGLM2.stop_token_ids(tok) == [2]


def test_v2_postprocess():
    assert CHATGLM2.postprocess("  [[训练时间]]发布, ok!\n", []) == (
        "2023年发布, ok!",
        [{"role": "assistant", "content": "2023年发布, ok!"}],
    )


def test_plain_templates_system_and_role_checks():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert CHATGLM.build_prompt(messages) == "Be brief.\nhi"
    assert CHATGLM2.build_prompt(messages) == "Be brief.\n\n[Round 1]\n\n问：hi\n\n答："
    for bad in (
        [],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "observation", "content": "{}"}],
    ):
        for template in (CHATGLM, CHATGLM2):
            with pytest.raises(GlmkitError):
                template.build_prompt(bad)
    with pytest.raises(GlmkitError, match="CharacterGLM"):
        CHATGLM.build_input_ids(None, messages, character={"bot_name": "x"})


# -- ChatGLM3-6B ---------------------------------------------------------------------------------


@needs_conformance
@pytest.mark.parametrize("chat", V3.get("chat", []), ids=lambda c: f"{len(c['history'])}-messages")
def test_v3_chat_prompt(v3, chat):
    ids = CHATGLM3.build_input_ids(v3, _messages(chat["history"], chat["query"]))
    assert ids == chat["build_chat_input_ids"]
    assert v3.decode(ids) == chat["decoded_prompt"]


@needs_conformance
@pytest.mark.parametrize("chat", _with_generation(V3), ids=lambda c: f"{len(c['history'])}-messages")
def test_v3_chat_response(v3, chat):
    messages = _messages(chat["history"], chat["query"])
    # the reference chat() drops the last generated token, then decodes and post-processes
    generated = _generated(V3, chat["build_chat_input_ids"])
    response, new = CHATGLM3.postprocess(v3.decode(generated[:-1]), messages)
    assert response == chat["response"]
    assert [*messages, *new] == chat["new_history"]


@needs_conformance
def test_v3_prompt_pieces(v3):
    pieces = V3["chat_prompt_pieces_hi_hello"]
    messages = _messages([["hi", "hello"]], "你好")
    ids = CHATGLM3.build_input_ids(v3, messages)
    assert ids == [piece["id"] for piece in pieces]
    assert v3.convert_ids_to_tokens(ids) == [piece["piece"] for piece in pieces]


@needs_conformance
@pytest.mark.parametrize("call", list(V3.get("build_single_message", {})))
def test_v3_build_single_message(v3, call):
    role, metadata, content = ast.literal_eval(call.removeprefix("build_single_message"))
    assert build_single_message(v3, role, metadata, content) == V3["build_single_message"][call]


@needs_conformance
def test_v3_tools_system_prompt(v3):
    recorded = V3["tools_system_prompt"]
    ids = CHATGLM3.build_input_ids(v3, _messages(recorded["history"], recorded["query"]))
    assert ids == recorded["input_ids"]
    assert v3.decode(ids) == recorded["decoded"]


@needs_conformance
@pytest.mark.parametrize("pair", V3.get("process_response", []), ids=lambda p: repr(p["output"][:20]))
def test_v3_process_response(pair):
    history = pair["history_in"]
    response, new = CHATGLM3.postprocess(pair["output"], history)
    assert response == pair["content"]
    assert [*history, *new] == pair["history_out"]


@needs_conformance
def test_v3_observation_and_stops(v3):
    messages = [
        {"role": "user", "content": "北京天气怎么样"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
        {"role": "observation", "content": '{"temperature": 22}'},
    ]
    ids = CHATGLM3.build_input_ids(v3, messages)
    assert ids[-1] == v3.get_command("<|assistant|>")
    assert v3.decode(ids).endswith('<|observation|> \n {"temperature": 22}<|assistant|>')
    assert "<|assistant|> get_weather\n ```python" in v3.decode(ids)
    assert CHATGLM3.stop_token_ids(v3) == [2, 64795, 64797]


@needs_conformance
def test_v3_template_needs_role_tokens(v2):
    with pytest.raises(GlmkitError, match="chatglm2 template"):
        CHATGLM3.build_input_ids(v2, [{"role": "user", "content": "hi"}])


TOOLS = [{"role": "system", "content": "tools:", "tools": [{"name": "f"}]}, {"role": "user", "content": "go"}]


@pytest.mark.parametrize(
    ("call", "parameters"),
    [
        ("tool_call(a=1, b='x')", {"a": 1, "b": "x"}),
        (
            "tool_call(xs=[1, -2.5], d={'k': None}, flag=True, t=(1, 2))",
            {"xs": [1, -2.5], "d": {"k": None}, "flag": True, "t": (1, 2)},
        ),
        ("tool_call()", {}),
    ],
)
def test_tool_calls_are_parsed_as_literals(call, parameters):
    assert parse_tool_call(call) == parameters
    response, new = CHATGLM3.postprocess(f"f\n```python\n{call}\n```", TOOLS)
    assert response == {"name": "f", "parameters": parameters}
    assert new == [{"role": "assistant", "metadata": "f", "content": f"```python\n{call}\n```"}]


@pytest.mark.parametrize(
    "call",
    [
        "tool_call(cmd=__import__('os').system('echo pwned'))",
        "tool_call(x=open('/etc/passwd').read())",
        "tool_call(1, 2)",
        "tool_call(**{'a': 1})",
        "other_call(a=1)",
        "tool_call(a=1",
        "print('hi')",
        "tool_call(a=b)",
    ],
)
def test_malformed_tool_calls_stay_text(call):
    assert parse_tool_call(call) is None
    response, new = CHATGLM3.postprocess(f"f\n```python\n{call}\n```", TOOLS)
    assert response == f"```python\n{call}\n```"
    assert new[0]["metadata"] == "f"


def test_v3_partial_reply_while_streaming():
    # postprocess runs on every partial reply while streaming; none of these may fail
    for text in ("", "f", "f\n", "f\n```py", "f\n```python\ntool_call(a=", "\nhel"):
        CHATGLM3.postprocess(text, TOOLS)


# -- CharacterGLM-6B -----------------------------------------------------------------------------

CARD = {
    "bot_name": "苏梦远",
    "user_name": "陆星辰",
    "bot_info": "当红歌手。\n喜欢音乐。",
    "user_info": "知名导演。",
}


def test_characterglm_prompt():
    messages = [
        {"role": "user", "content": "你好\n最近怎么样？"},
        {"role": "assistant", "content": "  还不错。 "},
        {"role": "user", "content": "一起去看电影吧"},
    ]
    assert CHARACTERGLM.build_prompt(messages, CARD) == (
        "以下是一段苏梦远和陆星辰之间的对话。\n"
        "关于苏梦远的信息：当红歌手。 喜欢音乐。\n"
        "关于陆星辰的信息：知名导演。\n"
        "[陆星辰]你好 最近怎么样？\n"
        "[苏梦远]还不错。\n"
        "[陆星辰]一起去看电影吧\n"
        "[苏梦远]"
    )


def test_characterglm_greeting_and_optional_info():
    card = {"bot_name": "小白", "user_name": "用户", "user_info": "", "greeting": "哥哥，\n我会死吗？"}
    expected = "以下是一段小白和用户之间的对话。\n[小白]哥哥， 我会死吗？\n[用户]不会的\n[小白]"
    query = [{"role": "user", "content": "不会的"}]
    assert CHARACTERGLM.build_prompt(query, card) == expected
    # the official demos keep the greeting in the history as ("", greeting): same prompt, no double greeting
    demo_history = [{"role": "user", "content": ""}, {"role": "assistant", "content": card["greeting"]}]
    assert CHARACTERGLM.build_prompt([*demo_history, *query], card) == expected
    assert CHARACTERGLM.build_prompt([*demo_history[1:], *query], card) == expected


def test_characterglm_errors():
    query = [{"role": "user", "content": "hi"}]
    with pytest.raises(GlmkitError, match="character card"):
        CHARACTERGLM.build_prompt(query, None)
    with pytest.raises(GlmkitError):
        CHARACTERGLM.build_prompt([{"role": "system", "content": "x"}, *query], CARD)
    with pytest.raises(GlmkitError):
        CHARACTERGLM.build_prompt([*query, {"role": "assistant", "content": "x"}], CARD)


@needs_conformance
def test_characterglm_ids_and_stops(v3):
    messages = [{"role": "user", "content": "你好"}]
    ids = CHARACTERGLM.build_input_ids(v3, messages, character=CARD)
    assert ids[:2] == [v3.get_command("[gMASK]"), v3.get_command("sop")]
    assert ids == v3.encode(CHARACTERGLM.build_prompt(messages, CARD))
    assert CHARACTERGLM.stop_token_ids(v3) == [2, 13]  # eos and the "\n" byte piece
    assert CHARACTERGLM.postprocess(" 嗯。\n", messages)[0] == "嗯。"


# -- detection -----------------------------------------------------------------------------------

CHATGLM2_CONFIG = {"model_type": "chatglm", "multi_query_attention": True, "padded_vocab_size": 65024}


def _checkpoint(tmp_path: Path, tokenizer_config: dict | None = None, name: str = "model") -> Path:
    directory = tmp_path / name
    directory.mkdir()
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return directory


@needs_conformance
@pytest.mark.parametrize(("directory", "template"), [(V1_DIR, "chatglm"), (V3_DIR, "chatglm3")])
def test_detect_conformance_checkpoints(directory, template):
    config = json.loads((directory / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    assert detect_chatglm_template(directory / "checkpoint", config) == template
    assert detect_chatglm_template(directory / "tokenizer", config) == template


@pytest.mark.parametrize(
    ("tokenizer_config", "config", "template"),
    [
        ({"name_or_path": "THUDM/chatglm2-6b"}, {"_name_or_path": "THUDM/chatglm2-6b"}, "chatglm2"),
        ({"name_or_path": "THUDM/chatglm-6b"}, {}, "chatglm2"),  # early chatglm2-6b-int4 files
        ({"name_or_path": "THUDM/chatglm3-6b-base"}, {}, "chatglm3"),
        ({"chat_template": "{{ '<|user|>' }}"}, {}, "chatglm3"),
        ({}, {"_name_or_path": "thu-coai/CharacterGLM-6B"}, "characterglm"),
        (
            {"name_or_path": "THUDM/chatglm2-6b"},
            {"auto_map": {"AutoModel": "modeling_characterglm.CharacterGLMForConditionalGeneration"}},
            "characterglm",
        ),
        ({}, {"_name_or_path": "/data/finetuned"}, None),
        ({"tokenizer_class": "ChatGLM4Tokenizer"}, {"padded_vocab_size": 151552}, "glm4"),
        ({}, {"padded_vocab_size": 151552}, "glm4"),
        ({}, {"eos_token_id": [151329, 151336, 151338]}, "glm4"),
    ],
)
def test_detect_by_names(tmp_path, tokenizer_config, config, template):
    directory = _checkpoint(tmp_path, tokenizer_config)
    assert detect_chatglm_template(directory, {**CHATGLM2_CONFIG, **config}) == template


def test_detect_by_directory_and_family(tmp_path):
    assert detect_chatglm_template(_checkpoint(tmp_path, name="chatglm3-6b-32k"), CHATGLM2_CONFIG) == "chatglm3"
    assert detect_chatglm_template(_checkpoint(tmp_path, name="ft"), {"position_encoding_2d": True}) == "chatglm"
    assert detect_chatglm_template(_checkpoint(tmp_path, name="llama"), {"model_type": "llama"}) is None
