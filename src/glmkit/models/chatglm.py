"""ChatGLM-6B: GLM blocks, 2D rotary positions and [MASK]/[gMASK] prefix attention, without remote code.

The numerics follow the official THUDM/chatglm-6b code (final revision 8b7d335), checked against its
outputs in ``shared/conformance/chatglm_v1``:

* the context (every token before ``<sop>``) attends bidirectionally, what follows ``<sop>`` causally;
* 2D positions: row 0 is the position (all tokens after ``<sop>`` share the mask token's), row 1 the
  block position (0 in the context, 1, 2, ... from ``<sop>`` on); each half of a head rotates by one row;
* rotary ``inv_freq`` is rounded through float16 even in float32 mode;
* attention scales the query by ``1/(sqrt(head_dim) * (layer+1))``, fills masked scores with -10000,
  multiplies back by ``layer+1`` and takes the softmax in float32;
* residuals add the *normalised* input, scaled: ``x = LN1(h); h = x*alpha + Attn(x); y = LN2(h);
  out = y*alpha + MLP(y)`` with ``alpha = sqrt(2 * 28)`` for any depth; tanh-approximated GELU.

Activations are ``[batch, seq, hidden]``; keys/values go to a static ``KVCache`` as
``[batch, heads, seq, head_dim]``.  The loading helpers at the end are shared with ``chatglm2.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models.base import Block, CausalLMOutput, KVCache, RowSlots
from glmkit.models.loading import allocate_cache, gpu_devices, layer_devices, load_pretrained
from glmkit.models.quantize import QuantizationSpec


@dataclass
class ChatGLMConfig:
    """The fields of a ChatGLM-6B ``config.json`` that shape the network (others are ignored)."""

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int = 130004  # <sop>: the context ends before it
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    pre_seq_len: int | None = None  # P-Tuning v2 prefix length
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # width of the prefix MLP; hidden_size when unset (official)
    quantization_bit: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChatGLMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def rotary_inv_freq(head_dim: int, device: torch.device) -> torch.Tensor:
    """Frequencies of the rotary half-heads, rounded through float16 as the reference's buffer is."""
    dim = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    return inv_freq.half().float()


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin ``[batch, seq, 1, head_dim]`` for 2D positions ``[batch, 2, seq]``.

    The first half of each head rotates by the position, the second by the block position; within a
    half the frequencies repeat (rotate-half layout).  Computed in float32, then cast.
    """
    angles = position_ids.float()[..., None] * rotary_inv_freq(head_dim, position_ids.device)
    position, block = angles.unbind(1)  # [batch, seq, head_dim/4] each
    emb = torch.cat([position, position, block, block], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE applied separately to both halves of the head: ``[.., head_dim]``."""
    halves = x.unflatten(-1, (2, 2, -1))  # [.., half, part, dim/4]
    rotated = torch.stack([-halves[..., 1, :], halves[..., 0, :]], dim=-2).flatten(-3)
    return x * cos + rotated * sin


def causal_blocked(n: int, past: int, key_blocked: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[batch|1, 1, n, past+n]``, True where one of ``n`` new tokens may not look: later tokens and
    the keys ``key_blocked`` ``[batch, past+n]`` marks (padding)."""
    blocked = torch.ones(n, past + n, dtype=torch.bool, device=device).triu(past + 1)[None]
    if key_blocked is not None:
        blocked = blocked | key_blocked[:, None, :]
    return blocked[:, None]


def run_layers(
    layers: nn.ModuleList,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    blocked: torch.Tensor | None,
    cache: Any,
    prefix: list[tuple[torch.Tensor, ...]] | None,
) -> torch.Tensor:
    """The GLM decoder layers in turn, each on its own device (layers may be spread over GPUs)."""
    for i, layer in enumerate(layers):
        dev = layer.input_layernorm.weight.device
        h = layer(
            h.to(dev),
            cos.to(dev),
            sin.to(dev),
            None if blocked is None else blocked.to(dev),
            i,
            cache,
            None if prefix is None else prefix[i],
        )
    return h


def rows_blocked(positions: torch.Tensor, length: int, prefix_length: int) -> torch.Tensor:
    """The mask of a decode step over rows of a cache, ``[n, 1, 1, prefix + length]``, True where a row's
    new token may not look: what lies past its own index ``positions[i]`` (the stale tail that a longer
    row, or an earlier request in the same row, left there); a P-Tuning prefix is seen by every row."""
    blocked = torch.arange(length, device=positions.device)[None] > positions[:, None]
    if prefix_length:
        blocked = F.pad(blocked, (prefix_length, 0), value=False)
    return blocked[:, None, None]


class PrefixEncoder(nn.Module):
    """P-Tuning v2: ``pre_seq_len`` trained key/value vectors for every layer, optionally made by an MLP
    ``embedding -> Linear(embedding_size, hidden) -> Tanh -> Linear(hidden, kv_size)`` (the embedding is
    ``hidden_size`` wide in ChatGLM-6B, ``kv_size`` wide in ChatGLM2/3)."""

    def __init__(self, pre_seq_len: int, kv_size: int, hidden_size: int, projection: bool, embedding_size: int) -> None:
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, embedding_size)
            self.trans = nn.Sequential(
                nn.Linear(embedding_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.projection else out


def prefix_key_values(
    encoder: PrefixEncoder,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch_size: int,
    training: bool,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(key, value)`` ``[1 | batch, kv_heads, pre_seq_len, head_dim]``, laid out as the
    official ``get_prompt`` reads the encoder output: ``[pre_seq_len, layer, key|value, head, head_dim]``."""
    weight = encoder.embedding.weight
    tokens = torch.arange(weight.shape[0], device=weight.device)
    kv = encoder(tokens).to(dtype).view(1, -1, num_layers * 2, kv_heads, head_dim)
    if training:  # the official recipe trains with dropout on the prefix, drawn for every row
        kv = F.dropout(kv.expand(batch_size, -1, -1, -1, -1), p=0.1, training=True)
    kv = kv.permute(2, 0, 3, 1, 4)  # [layer*2, 1 | batch, kv_heads, pre_seq_len, head_dim]
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        blocked: torch.Tensor | None,
        layer_id: int,
        cache: KVCache | RowSlots | None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        # the fused projection is laid out per head: [q | k | v] of head 0, then head 1, ...
        q, k, v = self.query_key_value(x).view(b, n, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q, k = apply_rotary_2d(q, cos, sin), apply_rotary_2d(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_id, k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
        # the reference's float16 overflow guard, kept for its exact rounding
        coeff = float(layer_id + 1)
        scores = torch.matmul(q / (math.sqrt(self.head_dim) * coeff), k.transpose(-1, -2))
        if blocked is not None:
            scores = scores.masked_fill(blocked, -10000.0)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)
        return self.dense(out)


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(Block):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        # sqrt(2 * 28) whatever num_layers says: the reference never passes num_layers to its blocks,
        # so they keep the default of the 28-layer ChatGLM-6B
        self.alpha = (2 * 28) ** 0.5
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        blocked: torch.Tensor | None,
        layer_id: int,
        cache: KVCache | RowSlots | None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        x = self.input_layernorm(h)
        h = x * self.alpha + self.attention(x, cos, sin, blocked, layer_id, cache, prefix)
        y = self.post_attention_layernorm(h)
        return y * self.alpha + self.mlp(y)


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len:
            self.prefix_encoder = self.build_prefix_encoder(config)

    @staticmethod
    def build_prefix_encoder(config: ChatGLMConfig) -> PrefixEncoder:
        kv_size = config.num_layers * 2 * config.hidden_size
        width = config.prefix_hidden_size or config.hidden_size
        return PrefixEncoder(config.pre_seq_len, kv_size, width, config.prefix_projection, config.hidden_size)

    def build_masks_and_positions(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference ``get_masks``/``get_position_ids``: ``[b, 1, s, s]`` (True = may not attend)
        and ``[b, 2, s]`` positions.

        With ``padding_mask`` (``[b, s]``, 0 on padding) pads are masked out and positions start after
        the left padding, as the reference tokenizer pads a batch (right padding, as training batches
        have it, moves no position); without it pads count as context, as the reference model does.
        """
        cfg = self.config
        b, s = input_ids.shape
        is_bos = input_ids == cfg.bos_token_id
        is_gmask = input_ids == cfg.gmask_token_id
        is_mask = input_ids == cfg.mask_token_id
        if not bool((is_bos.any(1) & (is_gmask | is_mask).any(1)).all()):
            raise GlmkitError("ChatGLM-6B needs [gMASK] (or [MASK]) and <sop> in every input row")
        context = is_bos.int().argmax(1)  # first <sop>
        mask_at = torch.where(is_gmask.any(1), is_gmask.int().argmax(1), is_mask.int().argmax(1))
        if padding_mask is None:
            pads = torch.zeros(b, s, dtype=torch.bool, device=input_ids.device)
        else:
            pads = padding_mask == 0
        num_pads = pads.int().cumprod(1).sum(1, keepdim=True)  # the leading ones
        idx = torch.arange(s, device=input_ids.device)[None]
        after = idx >= context[:, None]
        position = torch.where(after, mask_at[:, None] - num_pads, (idx - num_pads).clamp(min=0))
        block = torch.where(after, idx - context[:, None] + 1, 0)
        blocked = (idx[:, None, :] > idx[:, :, None]) & after[:, None, :]
        blocked = blocked | pads[:, :, None] | pads[:, None, :]
        return blocked[:, None], torch.stack([position, block], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, n = input_ids.shape
        past = cache.length if cache is not None else 0
        if past == 0:
            blocked, position_ids = self._prefill_inputs(input_ids, attention_mask, position_ids)
        else:
            blocked, position_ids = self._step_inputs(cache, b, n, attention_mask, position_ids)
        if cache is not None:
            self._remember(cache, past, n, blocked if attention_mask is not None else None, position_ids)

        dtype = self.word_embeddings.weight.dtype
        prefix = self._prefix(cache, b, dtype)
        if prefix is not None and blocked is not None:
            blocked = F.pad(blocked, (self.config.pre_seq_len, 0), value=False)  # everyone sees the prefix
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, dtype)

        h = self._layers(self.word_embeddings(input_ids), cos, sin, blocked, cache, prefix)
        if cache is not None:
            cache.advance(n)
        return h

    def decode_rows(
        self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states ``[n, 1, hidden]`` for one new token of each of ``n`` sequences held in rows
        of ``cache`` (see ``ChatGLMForConditionalGeneration.decode_rows``).  A generated token sits at
        ``[mask_position, index + block_offset]``, both of its row, kept by the row's prefill."""
        cfg = self.config
        dtype = self.word_embeddings.weight.dtype
        index = torch.arange(input_ids.shape[0], device=positions.device) if rows is None else rows
        state = cache.state
        position_ids = torch.stack([state["mask_position"][index], positions + state["block_offset"][index]], dim=1)
        # the prompt was bidirectional at prefill; a generated token attends causally, as in the others
        prefix = self._prefix(cache, input_ids.shape[0], dtype)
        blocked = rows_blocked(positions, cache.max_length, cfg.pre_seq_len if prefix else 0)
        cos, sin = rotary_cos_sin(position_ids[:, :, None], cfg.head_dim, dtype)
        slots = RowSlots(cache, rows, positions)
        return self._layers(self.word_embeddings(input_ids), cos, sin, blocked, slots, prefix)

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        blocked: torch.Tensor | None,
        cache: KVCache | RowSlots | None,
        prefix: list[tuple[torch.Tensor, ...]] | None,
    ) -> torch.Tensor:
        """The decoder layers and the final norm."""
        h = run_layers(self.layers, h, cos, sin, blocked, cache, prefix)
        return self.final_layernorm(h.to(self.final_layernorm.weight.device))

    def _prefill_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None and attention_mask.dim() == 4:  # the reference's own format
            blocked = attention_mask.bool()
            if position_ids is None:
                position_ids = self.build_masks_and_positions(input_ids)[1]
            return blocked, position_ids
        blocked, built_positions = self.build_masks_and_positions(input_ids, attention_mask)
        return blocked, built_positions if position_ids is None else position_ids

    def _step_inputs(
        self,
        cache: KVCache,
        b: int,
        n: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Tokens after the cached ones are generated tokens: causal, at ``[mask_position, block]``."""
        past, state = cache.length, cache.state
        if position_ids is None:
            idx = torch.arange(past, past + n, device=state["block_offset"].device)
            position = state["mask_position"][:, None].expand(b, n)
            position_ids = torch.stack([position, idx[None] + state["block_offset"][:, None]], dim=1)
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool(), position_ids
        if attention_mask is not None:  # [b, past+n] padding mask, 1 = attend
            key_blocked = attention_mask == 0
        elif "key_blocked" in state:
            state["key_blocked"][:, past : past + n] = False
            key_blocked = state["key_blocked"][:, : past + n]
        else:
            key_blocked = None
        if key_blocked is None and n == 1:
            return None, position_ids
        return causal_blocked(n, past, key_blocked, position_ids.device), position_ids

    def _remember(
        self, cache: KVCache, past: int, n: int, blocked: torch.Tensor | None, position_ids: torch.Tensor
    ) -> None:
        """Keep what later steps need: the mask position, the block position offset and, when the
        caller passed a mask, which cached keys stay hidden (what the last query row may not see)."""
        state = cache.state
        if past == 0:
            state.clear()
        state["mask_position"] = position_ids[:, 0, -1]
        state["block_offset"] = position_ids[:, 1, -1] - (past + n - 1)
        if cache.row_of is not None:  # a row of a batch cache: decode_rows reads its positions there
            batch, row = cache.row_of
            for name in ("mask_position", "block_offset"):
                rows = batch.state.setdefault(name, torch.zeros(batch.keys[0].shape[0], dtype=torch.long,
                                                                device=position_ids.device))  # fmt: skip
                rows[row] = state[name][0]
        if blocked is not None:
            if "key_blocked" not in state:
                state["key_blocked"] = torch.zeros(
                    blocked.shape[0], cache.max_length, dtype=torch.bool, device=blocked.device
                )
            state["key_blocked"][:, : past + n] = blocked[:, 0, -1, :]

    def _prefix(
        self, cache: KVCache | None, batch_size: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, ...]] | None:
        if not self.config.pre_seq_len:
            return None
        if cache is not None and "prefix" in cache.state:
            return cache.state["prefix"]
        cfg = self.config
        kv = prefix_key_values(
            self.prefix_encoder, cfg.num_layers, cfg.num_attention_heads, cfg.head_dim, dtype, batch_size, self.training
        )
        kv = [(k.to(dev), v.to(dev)) for (k, v), dev in zip(kv, layer_devices(self.layers), strict=True)]
        if cache is not None:
            cache.state["prefix"] = kv
        return kv


class ChatGLMForConditionalGeneration(nn.Module):
    """ChatGLM-6B with its LM head (tied to the word embeddings, as the reference ties them on load)."""

    supports_prefix_reuse = False  # the context attends bidirectionally: a longer prompt changes it all
    # present in official checkpoints, carrying nothing: RoPE buffers the reference ignores on load,
    # and the LM head it ties to the word embeddings
    ignored_checkpoint_keys = re.compile(r"lm_head\.weight|transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq")

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        if not config.position_encoding_2d:
            raise GlmkitError("ChatGLM-6B checkpoints with position_encoding_2d=false are not supported")
        self.config = config
        self.transformer = ChatGLMModel(config)
        self.context_length = config.max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        ptuning_checkpoint: str | Path | None = None,
        num_gpus: int = 1,
        quantize: QuantizationSpec | None = None,
    ) -> ChatGLMForConditionalGeneration:
        """Load an official checkpoint directory; ``num_gpus > 1`` spreads the layers over GPUs 0..N-1;
        ``quantize`` quantizes a float checkpoint's decoder linears on the way (see ``load_pretrained``)."""
        devices = gpu_devices(device, num_gpus)
        return load_pretrained(cls, ChatGLMConfig, path, dtype, devices, ptuning_checkpoint, quantize)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        cfg = self.config
        dtype = self.transformer.word_embeddings.weight.dtype
        return allocate_cache(self.blocks, batch_size, cfg.num_attention_heads, max_length, cfg.head_dim, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]``.

        ``attention_mask``: the reference's bool ``[b, 1, s, s+past]`` (True = may not attend), or a
        ``[b, past+s]`` padding mask (1 = token, 0 = left padding).  ``position_ids``: ``[b, 2, s]``.
        Both are built from ``input_ids`` (and the cache) when left out.
        """
        h = self.transformer(input_ids, attention_mask, position_ids, cache)
        if last_only:
            h = h[:, -1:]
        return CausalLMOutput(logits=F.linear(h, self.transformer.word_embeddings.weight))

    def decode_rows(
        self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """One new token for each of several sequences stored in rows of ``cache`` (the engine's decode step).

        ``input_ids`` ``[n, 1]``; row ``rows[i]`` (row ``i`` when ``rows`` is None) holds ``positions[i]``
        tokens, filled by ``forward`` on ``cache.row(rows[i])`` (which keeps the row's 2D position in
        ``cache.state``), and the new token goes to index ``positions[i]``.  Shapes depend only on ``n``
        and the cache, and nothing waits for the device.  Returns next-token logits ``[n, vocab]``.
        """
        h = self.transformer.decode_rows(input_ids, cache, rows, positions)
        return F.linear(h, self.transformer.word_embeddings.weight)[:, -1]
