"""The decode loop: prefill, then one token at a time over the model's KV cache.

This is the only place glmkit runs a generation loop; chat, CLI and servers all come through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.engine.config import GenerationConfig, token_budget
from glmkit.engine.detokenizer import StreamingDetokenizer
from glmkit.engine.sampling import next_token
from glmkit.engine.stop_strings import StopStringMatcher, cut_at_stop
from glmkit.models.base import Cache, CausalLM


@dataclass
class DecodeSession:
    """A KV cache kept between calls, so a prompt that extends the last conversation prefills only
    what is new.  ``tokens`` are the ids whose keys/values the cache holds."""

    cache: Cache | None = None
    tokens: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.cache = None
        self.tokens = []


@dataclass
class Chunk:
    """A piece of streamed reply.  The last chunk of a stream has ``finish_reason`` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)  # reply ids behind this piece
    finish_reason: str | None = None  # "stop" (stop token or string) or "length" (budget spent)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def _model_device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device  # type: ignore[attr-defined]


def _prepare_cache(
    model: CausalLM, prompt_ids: list[int], capacity: int, session: DecodeSession | None
) -> tuple[Cache, int]:
    """A cache ready for ``prompt_ids``, and how many prompt ids it already holds."""
    if session is not None and session.cache is not None and model.supports_prefix_reuse:
        reusable = 0
        for old, new in zip(session.tokens, prompt_ids, strict=False):
            if old != new:
                break
            reusable += 1
        reusable = min(reusable, len(prompt_ids) - 1)  # the last prompt id must run to give logits
        if session.cache.max_length >= capacity and reusable > 0:
            session.cache.crop(reusable)
            reusable = session.cache.length  # a cache may drop more than asked
            session.tokens = session.tokens[:reusable]
            if reusable:
                return session.cache, reusable
    size = model.context_length if session is not None else capacity
    cache = model.new_cache(batch_size=1, max_length=size)
    if session is not None:
        session.cache, session.tokens = cache, []
    return cache, 0


def iter_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    config: GenerationConfig,
    stop_token_ids: tuple[int, ...] = (),
    use_cache: bool = True,
    session: DecodeSession | None = None,
) -> Iterator[int]:
    """Yield generated ids one by one, a stop id included; ends at a stop id or when the budget is spent."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    budget = token_budget(len(prompt_ids), config, model.context_length)
    stops = set(stop_token_ids) | set(config.stop_token_ids)
    device = _model_device(model)
    generator = None
    if config.seed is not None and not config.greedy:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    seen = torch.tensor([prompt_ids], device=device)
    cache, cached = (None, 0)
    if use_cache:
        cache, cached = _prepare_cache(model, prompt_ids, len(prompt_ids) + budget, session)
    pending = seen[:, cached:] if use_cache else seen
    try:
        with torch.inference_mode():
            for _ in range(budget):
                logits = model(pending, cache=cache, last_only=True).logits[:, -1]
                if session is not None and use_cache:
                    session.tokens.extend(pending[0].tolist())
                token = next_token(logits, config, seen, generator)
                token_id = int(token)
                seen = torch.cat([seen, token[:, None]], dim=1)
                pending = token[:, None] if use_cache else seen
                yield token_id
                if token_id in stops:
                    return
    except BaseException:
        # an interrupted forward may leave the cache half written: never reuse it
        if session is not None:
            session.reset()
        raise


def generate_tokens(
    model: CausalLM,
    prompt_ids: list[int],
    config: GenerationConfig,
    stop_token_ids: tuple[int, ...] | list[int] = (),
    use_cache: bool = True,
) -> list[int]:
    """All generated ids (a final stop id included) for one prompt."""
    return list(iter_tokens(model, prompt_ids, config, tuple(stop_token_ids), use_cache))


class Engine:
    """A model, its tokenizer and the stop rules of its chat template: text in and out."""

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any,
        stop_token_ids: tuple[int, ...] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = tuple(stop_token_ids)
        self.skip_special_tokens = skip_special_tokens

    def _stops(self, config: GenerationConfig) -> set[int]:
        return set(self.stop_token_ids) | set(config.stop_token_ids)

    def stream(
        self, prompt_ids: list[int], config: GenerationConfig, session: DecodeSession | None = None
    ) -> Iterator[Chunk]:
        """Stream the reply as text pieces that never split a character or show a stop string."""
        stops = self._stops(config)
        detokenizer = StreamingDetokenizer(self.tokenizer, self.skip_special_tokens)
        matcher = StopStringMatcher(config.stop)
        ids: list[int] = []  # reply ids not yet handed out with a chunk
        count, finish, string_hit = 0, "length", False
        for token_id in iter_tokens(self.model, prompt_ids, config, tuple(stops), session=session):
            count += 1
            if token_id in stops:
                finish = "stop"
                break
            ids.append(token_id)
            text, string_hit = matcher.feed(detokenizer.push(token_id))
            if text or string_hit:
                yield Chunk(text, token_ids=ids)
                ids = []
            if string_hit:
                finish = "stop"
                break
        if not string_hit:
            text, string_hit = matcher.feed(detokenizer.flush())
            if string_hit:
                finish = "stop"
            else:
                text += matcher.flush()
            if text or ids:
                yield Chunk(text, token_ids=ids)
        yield Chunk("", finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=count)

    def generate(
        self, prompt_ids: list[int], config: GenerationConfig, session: DecodeSession | None = None
    ) -> GenerationResult:
        """The whole reply, decoded in one piece (the stream only decides where it ends)."""
        reply_ids: list[int] = []
        finish = "length"
        for chunk in self.stream(prompt_ids, config, session):
            reply_ids.extend(chunk.token_ids)
            finish = chunk.finish_reason or finish
        text = self.tokenizer.decode(reply_ids, skip_special_tokens=self.skip_special_tokens)
        text, _ = cut_at_stop(text, config.stop)
        return GenerationResult(
            text=text, token_ids=reply_ids, finish_reason=finish, prompt_tokens=len(prompt_ids)
        )
