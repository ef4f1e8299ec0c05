"""One request's reply: generated ids in, text chunks out, with the stop rules applied.

Shared by the single-request loop (``Engine.stream``) and the batch scheduler, so both end a
reply the same way: at a stop id, at a stop string, or when the token budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmkit.engine.config import GenerationConfig
from glmkit.engine.detokenizer import StreamingDetokenizer
from glmkit.engine.stop_strings import StopStringMatcher


@dataclass
class Chunk:
    """A piece of streamed reply.  The last chunk of a stream has ``finish_reason`` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)  # reply ids behind this piece
    finish_reason: str | None = None  # "stop" (stop token or string) or "length" (budget spent)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplyBuilder:
    def __init__(
        self,
        tokenizer: Any,
        config: GenerationConfig,
        stop_token_ids: set[int],
        prompt_tokens: int,
        budget: int,
        skip_special_tokens: bool = True,
    ) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer, skip_special_tokens)
        self.matcher = StopStringMatcher(config.stop)
        self.stop_token_ids = stop_token_ids
        self.prompt_tokens = prompt_tokens
        self.budget = budget
        self.count = 0
        self.done = False
        self._ids: list[int] = []  # reply ids not yet handed out with a chunk

    def push(self, token_id: int) -> list[Chunk]:
        """Chunks made final by one more generated id; the last one has ``finish_reason`` once done."""
        if self.done:
            raise RuntimeError("reply already finished")
        self.count += 1
        if token_id in self.stop_token_ids:
            return self._finish("stop")
        self._ids.append(token_id)
        text, hit = self.matcher.feed(self.detokenizer.push(token_id))
        chunks = [self._chunk(text)] if text or hit else []
        if hit:
            self.done = True
            return [*chunks, self._final("stop")]
        if self.count >= self.budget:
            return [*chunks, *self._finish("length")]
        return chunks

    def _finish(self, reason: str) -> list[Chunk]:
        text, hit = self.matcher.feed(self.detokenizer.flush())
        if not hit:
            text += self.matcher.flush()
        self.done = True
        chunks = [self._chunk(text)] if text or self._ids else []
        return [*chunks, self._final("stop" if hit else reason)]

    def _chunk(self, text: str) -> Chunk:
        chunk = Chunk(text, token_ids=self._ids)
        self._ids = []
        return chunk

    def _final(self, reason: str) -> Chunk:
        return Chunk("", finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=self.count)
