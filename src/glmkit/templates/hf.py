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
        text = self._render(tokenizer, messages, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise GlmkitError("this model's tokenizer has no chat template: choose one with --template")
        # ChatGLM3 calls tool results "observation"; Hugging Face templates call them "tool"
        plain = [
            {"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]} for m in messages
        ]
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)

    def render_conversation(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[tuple[list[int], bool]]:
        """A whole conversation as ``(ids, trained)`` segments, for fine-tuning.

        Each assistant reply is trained through its first stop token (so the model learns to end it);
        the text between replies is not.  The ids before a reply are the ids of what ``build_input_ids``
        renders for the messages before it, piece by piece: the template's own text, cut where replies
        start and end.
        """
        if character:
            raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")
        text = self._render(tokenizer, messages, add_generation_prompt=False)
        cuts = [0]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if all(earlier["role"] == "system" for earlier in messages[:i]):
                raise GlmkitError("a reply needs a user message before it: chat templates do not start with one")
            prompt = self._render(tokenizer, messages[:i], add_generation_prompt=True)
            turn = self._render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(prompt) and text.startswith(turn) and cuts[-1] <= len(prompt) <= len(turn)):
                # e.g. templates that drop earlier turns' reasoning: the chat prompt is no prefix of the whole
                raise GlmkitError(
                    "this model's chat template renders earlier turns differently inside a longer conversation, "
                    "so its replies cannot be cut out of one sequence: train on single-turn rows"
                )
            cuts += [len(prompt), len(turn)]
        stops = set(self.stop_token_ids(tokenizer))
        segments: list[tuple[list[int], bool]] = []
        for k, (start, end) in enumerate(zip(cuts, [*cuts[1:], len(text)], strict=True)):
            ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"] if end > start else []
            if k % 2 == 0:
                segments.append((ids, False))
                continue
            stop = next((j + 1 for j, token in enumerate(ids) if token in stops), len(ids))
            segments += [(ids[:stop], True), (ids[stop:], False)]
        return segments

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = text.strip()
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = HFChatTemplate()
