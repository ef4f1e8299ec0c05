"""The shape every prompt template has.  Templates are pure: token ids in, token ids out, no torch.

A message is ``{"role": "system" | "user" | "assistant" | "observation", "content": str}``, with
optional ``"metadata"`` (ChatGLM3 tool name) and ``"tools"`` (ChatGLM3 system message).
"""

from __future__ import annotations

from typing import Any, Protocol

Message = dict[str, Any]


class ChatTemplate(Protocol):
    """A template may also have ``generation_defaults``: sampling settings its model family is used with
    (as CharacterGLM's official ``chat()`` samples), under the checkpoint's ``generation_config.json``."""

    name: str
    #: decode generated ids with special tokens removed before ``postprocess`` sees the text
    skip_special_tokens: bool

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        """Prompt ids that end where the assistant's next reply starts."""
        ...

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Token ids that end the assistant's reply (not part of the reply)."""
        ...

    def postprocess(self, text: str, messages: list[Message]) -> tuple[Any, list[Message]]:
        """The user-facing response for generated ``text`` (a str, or a dict for a ChatGLM3 tool call),
        and the assistant message(s) that join the history."""
        ...
