"""Turn next-token logits into a token: repetition penalty, temperature, top-k, top-p, seeded draws."""

from __future__ import annotations

import torch

from glmkit.engine.config import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers applies it): shrink the logits of tokens already seen."""
    scores = logits.gather(-1, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen_ids, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose mass reaches top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p; the best token always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen_ids: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits`` ``[batch, vocab]``, ``seen_ids`` ``[batch, n]`` (prompt and reply) -> tokens ``[batch]``."""
    logits = logits.float()
    if config.repetition_penalty != 1.0 and seen_ids.numel():
        logits = apply_repetition_penalty(logits, seen_ids, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def seeded_generator(config: GenerationConfig, device: torch.device) -> torch.Generator | None:
    """A private random stream for a request that asked for a seed, so its draws are reproducible."""
    if config.seed is None or config.greedy:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)
