"""Turn next-token logits into tokens for a whole batch at once, each row with its own settings.

Per-row settings (temperature, top-p, top-k, repetition penalty, seed) live on the device as tensors,
so a batch of requests with different settings costs the same few kernels as one request, and no host
sync.  Draws use the Gumbel-max trick, ``argmax(logits / T + G)`` with ``G`` Gumbel noise, which is a
draw from ``softmax(logits / T)``; the noise is a counter-based hash of (the row's seed, its draw index,
the token id) rather than a ``torch.Generator``, so a row's draws depend on nothing but its own seed
and step: a seeded request samples the same alone or beside any others.
"""

from __future__ import annotations

import torch

from glmkit.engine.config import GenerationConfig

MASK32 = 0xFFFFFFFF
# odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows
_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)
_GOLDEN = 0x61C88647


def mix32(x):
    """A 32-bit integer hash (lowbias32-style xor-shift-multiply); works on ints and int64 tensors."""
    for multiplier in _MULTIPLIERS:
        x = x ^ (x >> 16)
        x = (x * multiplier) & MASK32
    return x ^ (x >> 15)


def seed_key(seed: int) -> int:
    """A 32-bit key for a 64-bit seed."""
    return mix32((seed & MASK32) ^ mix32(seed >> 32))


def gumbel_noise(keys: torch.Tensor, draws: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[rows, vocab]`` Gumbel noise, a pure function of each row's key, draw index and the token id."""
    step_keys = mix32(keys ^ mix32(draws & MASK32))[:, None]
    ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = mix32(mix32(((ids * _GOLDEN) & MASK32) ^ step_keys) ^ step_keys)
    return -torch.log(-torch.log(uniform_from_bits(bits)))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Floats strictly inside (0, 1) from 32-bit hashes. (2**24 - 1) + 0.5 rounds to 2**24 in float32,
    which made u = 1 and the noise +inf once in 2**24 tokens: ~1% of the steps over GLM-4's 151552 ids,
    each one a token drawn whatever the logits said. That one value is clamped below 1."""
    return (((bits >> 8).float() + 0.5) * 2.0**-24).clamp(max=1.0 - 2.0**-24)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty (as transformers applies it): shrink the logits of tokens already seen.
    ``seen`` ``[rows, vocab]`` bool, ``penalty`` ``[rows]``."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k (0: no limit) and outside the smallest set whose
    mass reaches its top_p (``inf``: no limit); the best token always stays."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)
    outside_k = rank >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = sorted_logits.masked_fill(outside_k, float("-inf")).softmax(dim=-1)
    # drop a token when the mass before it already reaches top_p
    drop = outside_k | ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class Sampler:
    """Sampling state for ``rows`` rows (a batch's requests, by row): settings as device tensors.

    ``assign`` gives a row a request's settings (once per request); ``sample`` draws the next token of
    a range of rows from their logits in one go, and counts the draw."""

    def __init__(self, rows: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.temperature = torch.ones(rows, device=device)
        self.top_p = torch.full((rows,), float("inf"), device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int64, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)
        self.keys = torch.zeros(rows, dtype=torch.int64, device=device)
        self.draws = torch.zeros(rows, dtype=torch.int64, device=device)
        self.seen: torch.Tensor | None = None  # [rows, vocab]: allocated when a row asks for a penalty
        # what each row needs, on the host: a batch runs only the stages that one of its rows needs
        self._greedy = [True] * rows
        self._filtered = [False] * rows
        self._penalized = [False] * rows
        self._prompts: dict[int, list[int]] = {}  # penalized rows whose prompt is not yet in ``seen``

    def assign(self, row: int, config: GenerationConfig, prompt_ids: list[int]) -> None:
        """Row ``row`` now decodes a request with ``config`` after ``prompt_ids``."""
        greedy = config.greedy
        # a request without a seed draws one from torch's global generator (so torch.manual_seed holds)
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.temperature[row] = 1.0 if greedy else config.temperature
        self.top_p[row] = float("inf") if greedy or config.top_p >= 1.0 else config.top_p
        self.top_k[row] = 0 if greedy else config.top_k
        self.penalty[row] = config.repetition_penalty
        self.greedy[row] = greedy
        self.keys[row] = seed_key(seed)
        self.draws[row] = 0
        self._greedy[row] = greedy
        self._filtered[row] = not greedy and (config.top_p < 1.0 or config.top_k > 0)
        self._penalized[row] = config.repetition_penalty != 1.0
        self._prompts.pop(row, None)
        if self._penalized[row]:
            self._prompts[row] = list(prompt_ids)

    def sample(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Tokens ``[n]`` for rows ``rows`` (``n`` of them) from their logits ``[n, vocab]``."""
        logits = logits.float()
        penalized = any(self._penalized[rows])
        if penalized:
            seen = self._seen(logits.shape[-1])[rows]
            logits = apply_repetition_penalty(logits, seen, self.penalty[rows])
        tokens = logits.argmax(dim=-1)
        if not all(self._greedy[rows]):
            scaled = logits / self.temperature[rows, None]
            if any(self._filtered[rows]):
                scaled = filter_top_k_top_p(scaled, self.top_k[rows], self.top_p[rows])
            noise = gumbel_noise(self.keys[rows], self.draws[rows], logits.shape[-1])
            tokens = torch.where(self.greedy[rows], tokens, (scaled + noise).argmax(dim=-1))
        self.draws[rows] += 1
        if penalized:
            seen.scatter_(1, tokens[:, None], True)
        return tokens

    def _seen(self, vocab_size: int) -> torch.Tensor:
        if self.seen is None:
            self.seen = torch.zeros(len(self._greedy), vocab_size, dtype=torch.bool, device=self.device)
        for row, ids in self._prompts.items():
            self.seen[row] = False
            ids = [i for i in ids if 0 <= i < vocab_size]  # an index past the vocabulary would fault the device
            self.seen[row, torch.tensor(ids, dtype=torch.int64, device=self.device)] = True
        self._prompts.clear()
        return self.seen
