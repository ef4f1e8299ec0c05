"""Incremental decoding that never shows half a character.

Decoding token by token breaks multi-byte characters (a Chinese character or an emoji can span
several byte-fallback tokens) and sentencepiece's leading-space rules.  So each step decodes a
small window of recent ids twice, with and without the new token, and shows the difference only
once it no longer ends in U+FFFD, the replacement character of an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # ids before this are already shown

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final."""
        self.ids.append(token_id)
        shown = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        if window.endswith(INCOMPLETE) or len(window) <= len(shown):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(shown) :]

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an unfinished character stays as U+FFFD)."""
        shown = self._decode(self.ids[self.prefix_offset : self.read_offset])
        window = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(shown) :]

    def text(self) -> str:
        """The whole reply decoded at once."""
        return self._decode(self.ids)
