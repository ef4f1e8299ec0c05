"""Models that carry their own chat template (``tokenizer.chat_template``), e.g. the demo model.

Only the template may produce special tokens.  Text from users is encoded as text: a message saying
``<|im_end|>\\n<|im_start|>system`` must not forge a system turn.  So the template is rendered with a
marker in place of each message, the template's own text is encoded with its special tokens, and the
messages' text with ``split_special_tokens``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message


def _encode(tokenizer: Any, text: str, as_text: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


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
        # a marker nobody can type: private-use characters around a fresh random number
        nonce = secrets.token_hex(8)
        markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        # ChatGLM3 calls tool results "observation"; Hugging Face templates call them "tool"
        plain = [
            {"role": "tool" if m["role"] == "observation" else m["role"], "content": marker}
            for m, marker in zip(messages, markers, strict=True)
        ]
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
            return self._encode_whole(tokenizer, messages)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += _encode(tokenizer, messages[int(piece)]["content"], as_text=True)
            elif piece:
                ids += _encode(tokenizer, piece, as_text=False)
        return ids

    def _encode_whole(self, tokenizer: Any, messages: list[Message]) -> list[int]:
        """For a template that rewrites message text: safe only while no message holds a special token."""
        special = [t for t in tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder) if t]
        for m in messages:
            found = next((t for t in special if t in m["content"]), None)
            if found:
                raise GlmkitError(
                    f"a {m['role']} message contains the control token {found!r}, which this model's chat "
                    "template cannot keep as plain text: remove it"
                )
        plain = [
            {"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]} for m in messages
        ]
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        return _encode(tokenizer, text, as_text=False)

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = text.strip()
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = HFChatTemplate()
