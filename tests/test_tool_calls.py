"""OpenAI tool calls over ChatGLM3's: ``tools`` / ``tool_choice`` in, ``tool_calls`` out (streamed too),
``role: "tool"`` as ChatGLM3's observation turn.  The server runs the conformance ChatGLM3 checkpoint
(tiny, random weights) and is driven with the ``openai`` client; what the official model replies is
taken from the reference outputs recorded in the conformance data."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import CONFORMANCE, live_server, load_expected, needs_conformance

import glmkit
from glmkit.serve import ServerOptions, create_app
from glmkit.serve.openai_api import assistant_message
from glmkit.templates import get_template

pytestmark = needs_conformance
RECORDED = load_expected(CONFORMANCE / "chatglm_v3").get("process_response", [])
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chatglm3")
    for part in ("checkpoint", "tokenizer"):
        for f in (CONFORMANCE / "chatglm_v3" / part).iterdir():
            (folder / f.name).symlink_to(f)
    return glmkit.load(folder, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def client(chatglm3):
    with live_server(create_app(chatglm3, ServerOptions())) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("case", RECORDED, ids=[json.dumps(c["output"])[:30] for c in RECORDED])
def test_recorded_replies_become_tool_calls_or_content(case):
    response, _ = get_template("chatglm3").postprocess(case["output"], case["history_in"])
    message, finish = assistant_message(response, "stop")
    expected = case["content"]
    if isinstance(expected, dict) and "parameters" in expected:
        assert finish == "tool_calls" and message["content"] is None
        [call] = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == expected["name"]
        assert json.loads(call["function"]["arguments"]) == expected["parameters"]
    else:
        assert finish == "stop" and "tool_calls" not in message
        shown = expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False)
        assert message["content"] == shown


def test_a_tool_call_in_the_history_is_chatglm3s_own_prompt(client, chatglm3):
    """The call goes back as the model wrote it, the tool's result as an observation, tools in the system."""
    messages = [
        {"role": "user", "content": "北京天气怎么样"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "北京", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    ]
    reply = client.chat.completions.create(model="glmkit", messages=messages, tools=[WEATHER], max_tokens=3)
    as_chatglm3 = [
        {"role": "system", "content": WEATHER_SYSTEM, "tools": [WEATHER["function"]]},
        {"role": "user", "content": "北京天气怎么样"},
        {"role": "assistant", "metadata": "get_weather", "content": WRITTEN_CALL},
        {"role": "observation", "content": '{"temperature": 22}'},
    ]
    assert reply.usage.prompt_tokens == len(chatglm3.encode(as_chatglm3))
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the same prompt the recorded reference reply came from: the call is what ChatGLM3 itself generated
    recorded = next(c for c in RECORDED if isinstance(c["content"], dict) and "parameters" in c["content"])
    assert recorded["output"].split("\n", 1)[1] == WRITTEN_CALL


WEATHER_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
WRITTEN_CALL = "```python\ntool_call(city='北京', unit='celsius')\n```"


def test_tools_offered_streamed_and_not(client, chatglm3):
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "北京天气怎么样"}]
    options = {"model": "glmkit", "messages": messages, "tools": [WEATHER], "max_tokens": 4, "temperature": 0}
    whole = client.chat.completions.create(**options)
    offered = [{"role": "system", "content": "Use tools.", "tools": [WEATHER["function"]]}, messages[1]]
    assert whole.usage.prompt_tokens == len(chatglm3.encode(offered))
    chunks = list(client.chat.completions.create(**options, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    # with tools offered the reply is held back and sent whole: the same message as without streaming
    message = whole.choices[0].message
    if message.tool_calls:
        streamed = [call for d in deltas for call in d.tool_calls or []]
        assert [c.function.name for c in streamed] == [c.function.name for c in message.tool_calls]
        assert finishes == ["tool_calls"]
    else:
        assert "".join(d.content or "" for d in deltas) == message.content
        assert finishes == [whole.choices[0].finish_reason]
    none = client.chat.completions.create(
        model="glmkit", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=1
    )
    assert none.usage.prompt_tokens == len(chatglm3.encode(messages)), "tool_choice none offers no tools"
    named = client.chat.completions.create(
        model="glmkit",
        messages=messages,
        tools=[WEATHER, {"type": "function", "function": {"name": "other"}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=1,
    )
    assert named.usage.prompt_tokens == len(chatglm3.encode(offered)), "a named choice offers that tool alone"
