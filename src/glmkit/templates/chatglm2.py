"""ChatGLM2-6B prompt: ``[Round N]\\n\\n问：…\\n\\n答：…\\n\\n`` rounds counted from 1, after ``[gMASK] sop``.

The prompt is plain text, so it needs no role tokens: ChatGLM2 and ChatGLM3 tokenizers give it the
same ids.
"""

from __future__ import annotations

from typing import Any

from glmkit.templates.base import Message
from glmkit.templates.chatglm import no_character, split_rounds


def strip_reply(text: str) -> str:
    """The ChatGLM2 reference's reply clean-up: outer whitespace and the training-date placeholder."""
    return text.strip().replace("[[训练时间]]", "2023年")


class ChatGLM2Template:
    name = "chatglm2"
    skip_special_tokens = False  # the reference decodes replies as they are

    def build_prompt(self, messages: list[Message]) -> str:
        system, history, query = split_rounds(messages, self.name)
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
        prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        # ChatGLM2-6B has no system prompt; glmkit puts one in front as a paragraph of its own.
        return f"{system}\n\n{prompt}" if system else prompt

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        no_character(character)
        return tokenizer.encode(self.build_prompt(messages))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id]

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = strip_reply(text)
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = ChatGLM2Template()
