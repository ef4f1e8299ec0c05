"""What the HTTP handlers share: the loaded model and the one scheduler that runs every generation.

A request is encoded and checked (context window included) and its first chunk awaited before any
response starts, so client mistakes, a full queue and early failures are proper HTTP errors rather
than a stream that breaks after a 200.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import State

from glmkit.chat import ChatModel
from glmkit.engine import Chunk, GenerationConfig
from glmkit.engine.config import token_budget
from glmkit.engine.scheduler import QueueFull, Scheduler, SchedulerClosed
from glmkit.errors import GlmkitError
from glmkit.serve.errors import APIError
from glmkit.templates import Message

RETRY_AFTER_SECONDS = 1


@dataclass
class Completion:
    text: str  # raw engine text, before the template's postprocess
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Reply:
    """The chunks of one submitted request; notes its token counts on the request for the access log."""

    def __init__(self, state: State, first: Chunk, rest: AsyncIterator[Chunk]) -> None:
        self._state = state
        self._first = first
        self._rest = rest

    def _note(self, chunk: Chunk) -> Chunk:
        if chunk.finish_reason:
            self._state.usage = (chunk.prompt_tokens, chunk.completion_tokens)
        return chunk

    async def chunks(self) -> AsyncIterator[Chunk]:
        # aclosing: leaving early (an error, a cancelled request) closes the scheduler's stream,
        # which cancels the generation and frees its slot
        async with contextlib.aclosing(self._rest) as rest:
            yield self._note(self._first)
            async for chunk in rest:
                yield self._note(chunk)

    async def complete(self) -> Completion:
        pieces: list[str] = []
        last = self._first
        try:
            async for chunk in self.chunks():
                pieces.append(chunk.text)
                last = chunk
        except SchedulerClosed as exc:  # shutting down: the reply was cut before it was whole
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        return Completion("".join(pieces), last.finish_reason or "length", last.prompt_tokens, last.completion_tokens)


@dataclass
class Backend:
    chat_model: ChatModel
    scheduler: Scheduler
    log_prompts: bool = False

    def _prepare(
        self, messages: list[Message], character: dict[str, str] | None, param: str, settings: dict[str, Any]
    ) -> tuple[list[int], GenerationConfig]:
        try:
            config = self.chat_model.generation(**settings)
        except GlmkitError as exc:
            raise APIError(400, str(exc)) from None
        try:
            prompt_ids = self.chat_model.encode(messages, character)
        except GlmkitError as exc:
            raise APIError(400, str(exc), param=param) from None
        try:
            # the scheduler's window: it may hold rows shorter than the model's own context
            token_budget(len(prompt_ids), config, self.scheduler.context_length)
        except GlmkitError as exc:
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        return prompt_ids, config

    async def start(
        self,
        state: State,
        messages: list[Message],
        character: dict[str, str] | None = None,
        *,
        param: str = "messages",
        **settings: Any,
    ) -> Reply:
        """Submit one request and wait for its first chunk; ``param`` names the prompt field in errors."""
        if self.log_prompts:
            state.prompt = messages
        # a long prompt takes a while to tokenize: off the event loop
        prompt_ids, config = await asyncio.to_thread(self._prepare, messages, character, param, settings)
        stream = self.scheduler.stream(prompt_ids, config)
        try:
            first = await anext(stream)
        except QueueFull as exc:
            raise APIError(
                429,
                f"the server is busy ({exc}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        except SchedulerClosed as exc:
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        except GlmkitError as exc:  # checked before submitting, so only a request the model cannot take
            raise APIError(400, str(exc), param=param) from None
        return Reply(state, first, stream)
