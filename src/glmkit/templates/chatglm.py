"""ChatGLM-6B prompt: ``[Round N]\\n问：…\\n答：…`` rounds counted from 0, the query alone when there is no
history, then ``[gMASK] <sop>`` from the tokenizer; replies get full-width punctuation next to Chinese."""

from __future__ import annotations

import re
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message

# A half-width , ! : ; ? right after or right before a CJK ideograph becomes full-width.
_PUNCTUATION = re.compile(r"(?<=[\u4e00-\u9fff])[,!:;?]|[,!:;?](?=[\u4e00-\u9fff])")
_FULL_WIDTH = str.maketrans(",!:;?", "，！：；？")


def split_rounds(messages: list[Message], template: str) -> tuple[str, list[tuple[str, str]], str]:
    """``(system, [(query, response), ...], query)`` from alternating user/assistant messages that end
    with a user message, after an optional system message (the plain-text ChatGLM formats)."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [message["role"] for message in messages]
    expected = ["user", "assistant"] * (len(messages) // 2) + ["user"]
    if roles != expected:
        raise GlmkitError(
            f"the {template} template needs alternating user/assistant messages ending with a user "
            f"message (after an optional system message), got roles {roles}"
        )
    contents = [message["content"] for message in messages]
    return system, list(zip(contents[0:-1:2], contents[1::2], strict=True)), contents[-1]


def no_character(character: dict[str, str] | None) -> None:
    if character:
        raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")


class ChatGLMTemplate:
    name = "chatglm"
    skip_special_tokens = False  # the reference decodes replies as they are

    def build_prompt(self, messages: list[Message]) -> str:
        system, history, query = split_rounds(messages, self.name)
        if history:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            prompt += f"[Round {len(history)}]\n问：{query}\n答："
        else:
            prompt = query
        # ChatGLM-6B has no system prompt; glmkit puts one on a line of its own in front.
        return f"{system}\n{prompt}" if system else prompt

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        no_character(character)
        # the prompt is all user and model text ([gMASK] <sop> are appended after it): none of it may
        # become a control token, though the reference tokenizer turns a typed "<sop>" into one
        return tokenizer.encode(self.build_prompt(messages), split_special_tokens=True)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id]

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = text.strip().replace("[[训练时间]]", "2023年")
        response = _PUNCTUATION.sub(lambda match: match.group().translate(_FULL_WIDTH), response)
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = ChatGLMTemplate()
