"""The decode loop: prefill, then one token at a time over the model's KV cache.

This is the only place glmkit runs a generation loop; chat, CLI and servers all come through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.engine.config import GenerationConfig, token_budget
from glmkit.engine.reply import Chunk, ReplyBuilder
from glmkit.engine.sampling import Sampler
from glmkit.engine.step import DecodeStep
from glmkit.engine.stop_strings import cut_at_stop
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
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def _model_device(model: CausalLM) -> torch.device:
    return next(model.parameters()).device  # type: ignore[attr-defined]


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many ids ``a`` and ``b`` have in common at their start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _prepare_cache(
    model: CausalLM, prompt_ids: list[int], capacity: int, session: DecodeSession | None
) -> tuple[Cache, int]:
    """A cache with room for ``capacity`` positions, and how many of ``prompt_ids`` it already holds."""
    if session is not None and session.cache is not None and model.supports_prefix_reuse:
        # the last prompt id must run to give logits; a cache may drop more than asked
        session.cache.crop(min(shared_prefix(session.tokens, prompt_ids), len(prompt_ids) - 1))
        reusable = session.cache.length
        if reusable:
            session.cache.grow(capacity)
            session.tokens = session.tokens[:reusable]
            return session.cache, reusable
    cache = model.new_cache(batch_size=1, max_length=capacity)
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
    """Yield generated ids one by one, a stop id included; ends at a stop id or when the budget is spent.

    With a cache, models that have ``decode_rows`` decode through the engine's ``DecodeStep`` (on CUDA a
    replayed graph); the others, and ``use_cache=False``, run their ``forward`` a token at a time."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    budget = token_budget(len(prompt_ids), config, model.context_length)
    stops = set(stop_token_ids) | set(config.stop_token_ids)
    device = _model_device(model)
    sampler = Sampler(1, device)
    sampler.assign(0, config, prompt_ids)
    first = slice(0, 1)
    cache, cached = (None, 0)
    ids = list(prompt_ids)
    try:
        if use_cache:
            cache, cached = _prepare_cache(model, prompt_ids, len(prompt_ids) + budget, session)
        with torch.inference_mode():
            logits = model(torch.tensor([ids[cached:]], device=device), cache=cache, last_only=True).logits[:, -1]
            if session is not None and use_cache:
                session.tokens.extend(ids[cached:])
            fast = use_cache and hasattr(model, "decode_rows")
            step: DecodeStep | None = None  # made after the first token, so its capture is not in its wait
            for produced in range(1, budget + 1):
                token = sampler.sample(logits, first)
                more = produced < budget
                if step is not None and more:
                    # start the next step before waiting for this token: the device computes it while
                    # the host reads the token and the caller handles it (wasted only after a stop id)
                    step.feed(token)
                    logits = step.run(1)
                token_id = int(token)  # the one host sync of a step
                yield token_id
                if token_id in stops or not more:
                    return
                ids.append(token_id)
                if fast:
                    if step is None:
                        step = DecodeStep(model, cache)
                        step.place(0, token_id, cache.length)
                        logits = step.run(1)
                    cache.length += 1  # the step stored the token's key/value
                else:
                    pending = ids[-1:] if use_cache else ids
                    logits = model(torch.tensor([pending], device=device), cache=cache, last_only=True).logits[:, -1]
                if session is not None and use_cache:
                    session.tokens.append(token_id)
    except GeneratorExit:  # the caller stopped reading at a yield: the cache is whole
        raise
    except BaseException:
        # an interrupted forward (Ctrl-C, an error) may leave the cache half written: never reuse it
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

    def stop_ids(self, config: GenerationConfig) -> set[int]:
        """The ids that end a reply under ``config``: the template's and the request's own."""
        return set(self.stop_token_ids) | set(config.stop_token_ids)

    def new_reply(self, prompt_length: int, config: GenerationConfig, context_length: int) -> ReplyBuilder:
        """What turns one request's generated ids into chunks; raises GlmkitError if the prompt is too long."""
        return ReplyBuilder(
            self.tokenizer,
            config,
            self.stop_ids(config),
            prompt_tokens=prompt_length,
            budget=token_budget(prompt_length, config, context_length),
            skip_special_tokens=self.skip_special_tokens,
        )

    def stream(
        self, prompt_ids: list[int], config: GenerationConfig, session: DecodeSession | None = None
    ) -> Iterator[Chunk]:
        """Stream the reply as text pieces that never split a character or show a stop string."""
        reply = self.new_reply(len(prompt_ids), config, self.model.context_length)
        for token_id in iter_tokens(self.model, prompt_ids, config, tuple(reply.stop_token_ids), session=session):
            yield from reply.push(token_id)
            if reply.done:
                return

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
        return GenerationResult(text=text, token_ids=reply_ids, finish_reason=finish, prompt_tokens=len(prompt_ids))
