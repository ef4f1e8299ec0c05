"""Models that carry their own chat template (``tokenizer.chat_template``), e.g. the demo model.

Only the template may produce special tokens.  Text from users is encoded as text: a message saying
``<|im_end|>\\n<|im_start|>system`` must not forge a system turn.  So the template is rendered with a
marker in place of each message, the template's own text is encoded with its special tokens, and the
messages' text with ``split_special_tokens``.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message

Piece = tuple[list[int], int | None]  # ids, and the index of the message they are the text of (None: template)


def _encode(tokenizer: Any, text: str, as_text: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]


def _text_only(messages: list[Message]) -> list[Message]:
    """A dict content (a parsed tool call kept in a history) as JSON text: Hugging Face templates take text."""
    return [
        {**m, "content": json.dumps(m["content"], ensure_ascii=False)} if isinstance(m["content"], dict) else m
        for m in messages
    ]


def _plain(messages: list[Message], contents: list[str]) -> list[dict[str, str]]:
    # ChatGLM3 calls tool results "observation"; Hugging Face templates call them "tool"
    return [
        {"role": "tool" if m["role"] == "observation" else m["role"], "content": content}
        for m, content in zip(messages, contents, strict=True)
    ]


class HFChatTemplate:
    name = "hf"
    skip_special_tokens = True

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        if character:
            raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")
        messages = _text_only(messages)
        pieces = self._pieces(tokenizer, messages, add_generation_prompt=True)
        if pieces is None:
            return self._encode_whole(tokenizer, messages)
        return [token for ids, _ in pieces for token in ids]

    def _render(self, tokenizer: Any, messages: list[Message], contents: list[str], add_generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise GlmkitError("this model's tokenizer has no chat template: choose one with --template")
        return tokenizer.apply_chat_template(
            _plain(messages, contents), add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _pieces(self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[Piece] | None:
        """The rendered conversation as encoded pieces; None if the template rewrites message text."""
        nonce = secrets.token_hex(8)  # a marker nobody can type: private-use characters around a fresh number
        markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
        text = self._render(tokenizer, messages, markers, add_generation_prompt)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
        if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
            return None
        pieces: list[Piece] = []
        for k, part in enumerate(parts):
            if k % 2:
                pieces.append((_encode(tokenizer, messages[int(part)]["content"], as_text=True), int(part)))
            elif part:
                pieces.append((_encode(tokenizer, part, as_text=False), None))
        return pieces

    def _encode_whole(self, tokenizer: Any, messages: list[Message]) -> list[int]:
        """For a template that rewrites message text: safe only while no message holds a special token."""
        special = [t for t in [*tokenizer.all_special_tokens, *tokenizer.added_tokens_encoder] if t]
        for m in messages:
            found = next((t for t in special if t in m["content"]), None)
            if found:
                raise GlmkitError(
                    f"a {m['role']} message contains the control token {found!r}, which this model's chat "
                    "template cannot keep as plain text: remove it"
                )
        text = self._render(tokenizer, messages, [m["content"] for m in messages], add_generation_prompt=True)
        return _encode(tokenizer, text, as_text=False)

    def render_conversation(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[tuple[list[int], bool]]:
        """A whole conversation as ``(ids, trained)`` segments, for fine-tuning.

        Each assistant reply is trained through its first stop token (so the model learns to end it);
        the text between replies is not.  The ids before each reply equal what ``build_input_ids`` gives
        for the messages before it, so a tuned model sees in chat exactly what it was trained on.
        """
        if character:
            raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")
        pieces = self._pieces(tokenizer, messages, add_generation_prompt=False)
        if pieces is None:
            raise GlmkitError("this model's chat template rewrites message text, so replies cannot be cut out of it")
        stops = set(self.stop_token_ids(tokenizer))
        segments: list[tuple[list[int], bool]] = []
        after_reply = False
        for ids, index in pieces:
            if index is None and after_reply:
                stop = next((j + 1 for j, token in enumerate(ids) if token in stops), len(ids))
                segments += [(ids[:stop], True), (ids[stop:], False)]
            elif index is not None and messages[index]["role"] == "assistant":
                if all(earlier["role"] == "system" for earlier in messages[:index]):
                    raise GlmkitError("a reply needs a user message before it: chat templates do not start with one")
                so_far = [token for segment, _ in segments for token in segment]
                if so_far != self.build_input_ids(tokenizer, messages[:index]):
                    # e.g. templates that drop earlier turns' reasoning: the chat prompt is no prefix of the whole
                    raise GlmkitError(
                        "this model's chat template renders earlier turns differently inside a longer "
                        "conversation, so its replies cannot be cut out of one sequence: train on single-turn rows"
                    )
                segments.append((ids, True))
            else:
                segments.append((ids, False))
            after_reply = index is not None and messages[index]["role"] == "assistant"
        return segments

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = text.strip()
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = HFChatTemplate()
