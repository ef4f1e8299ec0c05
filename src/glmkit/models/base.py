"""What every model family gives the engine: a forward pass over a key/value cache.

A family module (``chatglm.py``, ``chatglm2.py``, ``hf_causal_lm.py``) is a ``torch.nn.Module`` with

    forward(input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False)
        -> CausalLMOutput(logits=[batch, seq, vocab])
    new_cache(batch_size, max_length) -> a cache with ``length``, ``max_length``, ``crop(n)``, ``grow(n)``
    context_length: int             # longest sequence the model accepts
    supports_prefix_reuse: bool     # may a cache filled by one prompt serve a longer one?

Without a cache, ``forward`` runs the whole sequence (masks and positions built as the reference
builds them).  With a cache, ``input_ids`` are the tokens that follow what the cache holds; the
model writes their keys/values into it, derives their positions from it and advances it.

Causal families that batch (``decode_rows`` and ``supports_prefix_reuse``: ``llama.py``, ``chatglm2.py``)
also take ``lengths`` ``[batch]``: rows padded on the right, row ``i``'s tokens its first ``lengths[i]``;
with ``last_only`` the logits are each row's last token's (``last_tokens``).  Under causal attention no
token sees the padding after it, so several prompts are prefilled in one forward exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class Cache(Protocol):
    length: int
    max_length: int

    def crop(self, length: int) -> None: ...

    def grow(self, max_length: int) -> None: ...


class CausalLM(Protocol):
    context_length: int
    supports_prefix_reuse: bool

    def new_cache(self, batch_size: int, max_length: int) -> Cache: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
    ) -> CausalLMOutput: ...


def last_tokens(h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``[batch, 1, hidden]``: the last position of each row, or with ``lengths`` position ``lengths[i] - 1``."""
    if lengths is None:
        return h[:, -1:]
    index = (lengths.to(h.device) - 1).view(-1, 1, 1).expand(-1, 1, h.shape[-1])
    return h.gather(1, index)


class Block(nn.Module):
    """A decoder layer.  With ``gradient_checkpointing`` set (the trainer sets it) a training forward
    keeps only the layer's input and recomputes the rest in the backward pass; decoding is unaffected."""

    gradient_checkpointing = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class KVCache:
    """Preallocated keys/values of every layer, ``[batch, kv_heads, max_length, head_dim]``.

    Fixed shapes (gpt-fast style) so a compiled decode step sees the same tensors every call.
    ``state`` holds what a family needs to derive later positions (e.g. ChatGLM-6B's mask position).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    #: ``0..W-1`` for a decode step that reads only the first W positions of each row (``window``); a
    #: tensor, not an int, so that a compiled step takes its length as a dynamic size
    window_positions: torch.Tensor | None = None
    #: for a cache made by ``row``: the batch cache and the row it is (a family may keep per-row state there)
    row_of: tuple[KVCache, int] | None = None

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def max_length(self) -> int:
        """Positions a row holds (or, for a window, the positions a decode step reads)."""
        return self.keys[0].shape[2] if self.window_positions is None else self.window_positions.shape[0]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[batch, kv_heads, new, head_dim]`` after what is cached; return all keys/values so far."""
        end = self.length + key.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, {end} requested")
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    @property
    def nbytes(self) -> int:
        """Memory held by the keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its ``n`` new positions."""
        self.length += n

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def grow(self, max_length: int) -> None:
        """Room for ``max_length`` positions per row, keeping what is stored (new tensors: take new views)."""
        if max_length <= self.max_length:
            return

        def bigger(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros((*old.shape[:2], max_length, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            return new

        # every layer grown before any is replaced: an interruption (Ctrl-C) leaves the old cache whole
        keys, values = [bigger(k) for k in self.keys], [bigger(v) for v in self.values]
        self.keys[:], self.values[:] = keys, values

    def window(self, length: int) -> KVCache:
        """This cache, for a decode step that reads only the first ``length`` positions of each row: the
        same tensors (writes go into the storage itself, nothing is copied) and state, a shorter
        ``max_length``."""
        positions = torch.arange(length, device=self.keys[0].device)
        return KVCache(keys=self.keys, values=self.values, state=self.state, window_positions=positions)

    def row(self, index: int) -> KVCache:
        """An empty one-row cache whose storage is row ``index`` of this one (for filling one slot)."""
        return KVCache(
            keys=[k[index : index + 1] for k in self.keys],
            values=[v[index : index + 1] for v in self.values],
            row_of=(self, index),
        )


class RowSlots:
    """Stands in for a ``KVCache`` in ``decode_rows``: the new key/value of sequence ``j`` goes to row
    ``rows[j]`` of ``cache`` (row ``j`` when ``rows`` is None) at index ``positions[j]``, and attention
    reads those rows whole (the mask hides what lies past each row's own length).

    With ``rows=None`` the rows are the leading ones, read as a view of the cache: no gather, the same
    addresses at every step, which is what a CUDA graph replays."""

    def __init__(self, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.cache = cache
        self.rows = rows
        self.positions = positions

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        positions = self.positions.to(keys.device)  # layers may be spread over GPUs
        n = key.shape[0]
        rows = torch.arange(n, device=keys.device) if self.rows is None else self.rows.to(keys.device)
        # written into the cache tensor itself, not a slice of it: a compiler then scatters in place,
        # where a write through a view makes it copy the whole view back
        keys[rows, :, positions] = key[:, :, 0]
        values[rows, :, positions] = value[:, :, 0]
        window = self.cache.max_length  # a window of the cache: only its first positions are read
        if self.rows is None:
            return keys[:n, :, :window], values[:n, :, :window]
        return keys[rows, :, :window], values[rows, :, :window]
