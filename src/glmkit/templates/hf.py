"""Models that carry their own chat template (``tokenizer.chat_template``), e.g. the demo model."""

from __future__ import annotations

from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message


class HFChatTemplate:
    name = "hf"
    skip_special_tokens = True

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        if character:
            raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")
        if not getattr(tokenizer, "chat_template", None):
            raise GlmkitError("this model's tokenizer has no chat template: choose one with --template")
        # ChatGLM3 calls tool results "observation"; Hugging Face templates call them "tool"
        plain = [
            {"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]} for m in messages
        ]
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = text.strip()
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = HFChatTemplate()
