"""ChatGLM2-6B, ChatGLM3-6B and CharacterGLM-6B (one network), without remote code.

Pre-norm decoder with RMSNorm, SwiGLU, multi-query attention (``multi_query_group_num`` key/value
heads), rotary positions on the first half of each head (interleaved pairs), a bias on the fused qkv
projection only, a final RMSNorm and an untied output layer.  Numerics follow the official
THUDM/chatglm3-6b code (checked against ``shared/conformance/chatglm_v3``): the RoPE tables are computed
in float32 and then cast to the model dtype.  ChatGLM2's code computes them in the model dtype, which
only differs in half precision (there it is less exact, so the ChatGLM3 behaviour is used for both).

Activations are ``[batch, seq, hidden]``; keys/values go to a static ``KVCache`` as
``[batch, kv_heads, seq, head_dim]``.  Besides the one-sequence forward, ``decode_rows`` advances
several independent sequences held in rows of one cache by a token each, every row at its own
position: that is what lets the scheduler decode concurrent requests as one batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from glmkit.errors import GlmkitError
from glmkit.models.base import Block, CausalLMOutput, KVCache, RowSlots, last_tokens
from glmkit.models.chatglm import PrefixEncoder, causal_blocked, prefix_key_values, rows_blocked, run_layers
from glmkit.models.loading import allocate_cache, gpu_devices, load_pretrained
from glmkit.models.quantize import QuantizationSpec

# cuDNN attention builds a plan for every new key length (~1.4 ms of CPU a call on an H200 with torch
# 2.11), and a decode step has a new one every time: 54 ms a token instead of 16 for ChatGLM3-6B.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ChatGLM2Config:
    """The fields of a ChatGLM2/3 ``config.json`` that shape the network (others are ignored)."""

    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    apply_residual_connection_post_layernorm: bool = False
    fp32_residual_connection: bool = False
    original_rope: bool = True
    rope_ratio: float = 1.0  # ChatGLM3-6B-32K stretches the RoPE base by this
    eos_token_id: int = 2
    pad_token_id: int = 0
    pre_seq_len: int | None = None  # P-Tuning v2 prefix length
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # width of the prefix MLP; hidden_size when unset (official)
    quantization_bit: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ChatGLM2Config:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[batch, seq, 1, head_dim/4]`` for positions ``[batch, seq]``: RoPE over the first
    ``head_dim/2`` channels, computed in float32, then cast."""
    dim = head_dim // 2
    theta = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.float()[..., None] * theta
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of the first half of each head; the rest passes."""
    rot = cos.shape[-1] * 2
    x0, x1 = x[..., :rot].unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.multi_query = config.multi_query_attention
        qkv_size = (self.num_heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

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
        qkv = self.query_key_value(x)
        if self.multi_query:  # [all queries | kv_heads keys | kv_heads values]
            d = self.head_dim
            q, k, v = qkv.split([self.num_heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
            q = q.view(b, n, self.num_heads, self.head_dim)
            k = k.view(b, n, self.kv_heads, self.head_dim)
            v = v.view(b, n, self.kv_heads, self.head_dim)
        else:  # per head [q | k | v]
            q, k, v = qkv.view(b, n, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer_id, k, v)
        if prefix is not None:
            k = torch.cat([prefix[0].expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(b, -1, -1, -1), v], dim=2)
        allowed = None if blocked is None else ~blocked
        group = self.num_heads // self.kv_heads  # query head h reads key/value head h // group
        with sdpa_kernel(ATTENTION_BACKENDS):
            if n == 1:
                # one query per head: fold each group's heads into the query axis, no key/value copies
                q = q.reshape(b, self.kv_heads, group, self.head_dim)
                if allowed is None:
                    out = F.scaled_dot_product_attention(q, k, v)
                else:
                    out = masked_decode_attention(q, k, v, allowed)
            else:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
                lead = k.shape[2] - n if blocked is None else 0
                if lead:
                    # causal after `lead` keys (a P-Tuning prefix, a cache) as square causal attention over
                    # queries padded in front: the fused causal kernels take no mask; the padding queries'
                    # outputs are dropped (full_attention_blocked keeps this to lead <= n)
                    q = F.pad(q, (0, 0, lead, 0))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=blocked is None)[:, :, lead:]
        return self.dense(out.reshape(b, self.num_heads, n, self.head_dim).transpose(1, 2).reshape(b, n, -1))


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention of a few queries per key/value head over a masked cache, as two matmuls and a float32
    softmax.  The fused SDPA kernels spread their work over batch x heads x query blocks only (2 blocks
    for one ChatGLM3 row: 19 us a layer on an H200 at 384 positions); matmuls spread it over the keys."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2)).float()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(Block):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

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
        h = h + self.self_attention(self.input_layernorm(h), cos, sin, blocked, layer_id, cache, prefix)
        return h + self.mlp(self.post_attention_layernorm(h))


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = _norm(config) if config.post_layer_norm else nn.Identity()


class ChatGLMModel(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.pre_seq_len:
            self.prefix_encoder = self.build_prefix_encoder(config)

    @staticmethod
    def build_prefix_encoder(config: ChatGLM2Config) -> PrefixEncoder:
        kv_size = config.num_layers * 2 * config.kv_heads * config.kv_channels
        width = config.prefix_hidden_size or config.hidden_size
        return PrefixEncoder(config.pre_seq_len, kv_size, width, config.prefix_projection, kv_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        cfg = self.config
        b, n = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past == 0:
            cache.state.clear()
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=input_ids.device)[None].expand(b, n)
            if past and "position_offset" in cache.state:  # a row filled by a batched prefill has none: 0
                position_ids = position_ids + cache.state["position_offset"][:, None]
        key_blocked = self._key_blocked(cache, past, n, attention_mask)
        if cache is not None:
            cache.state["position_offset"] = position_ids[:, -1] - (past + n - 1)

        dtype = self.embedding.word_embeddings.weight.dtype
        prefix = self._prefix(cache, b, dtype)
        blocked = full_attention_blocked(n, past, key_blocked, cfg.pre_seq_len if prefix else 0, input_ids.device)
        cos, sin = rotary_cos_sin(position_ids, cfg.kv_channels, 10000 * cfg.rope_ratio, dtype)

        h = self._layers(self.embedding(input_ids), cos, sin, blocked, cache, prefix)
        if cache is not None:
            cache.advance(n)
        return h

    def decode_rows(
        self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states ``[n, 1, hidden]`` for one new token of each of ``n`` sequences held in rows
        of ``cache`` (see ``ChatGLM2ForConditionalGeneration.decode_rows``)."""
        cfg = self.config
        dtype = self.embedding.word_embeddings.weight.dtype
        prefix = self._prefix(cache, input_ids.shape[0], dtype)  # the same for every row: kept in cache.state
        # static shapes, no host sync: every row attends over the cache's whole window under a mask
        blocked = rows_blocked(positions, cache.max_length, cfg.pre_seq_len if prefix else 0)
        cos, sin = rotary_cos_sin(positions[:, None], cfg.kv_channels, 10000 * cfg.rope_ratio, dtype)
        slots = RowSlots(cache, rows, positions)
        return self._layers(self.embedding(input_ids), cos, sin, blocked, slots, prefix)

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        blocked: torch.Tensor | None,
        cache: KVCache | RowSlots | None,
        prefix: list[tuple[torch.Tensor, ...]] | None,
    ) -> torch.Tensor:
        """The decoder layers and the final norm, on the output layer's device."""
        h = run_layers(self.encoder.layers, h, cos, sin, blocked, cache, prefix)
        return self.encoder.final_layernorm(h.to(self.output_layer.weight.device))

    def _key_blocked(
        self, cache: KVCache | None, past: int, n: int, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``[b, past+n]`` True on padding keys (from ``attention_mask``, 1 = token, or from what the
        cache remembers of an earlier mask); None when nothing is padded."""
        if attention_mask is not None:
            if attention_mask.shape[1] != past + n:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected {past + n}")
            key_blocked = attention_mask == 0
            if cache is not None:
                if "key_blocked" not in cache.state:
                    cache.state["key_blocked"] = torch.zeros(
                        key_blocked.shape[0], cache.max_length, dtype=torch.bool, device=key_blocked.device
                    )
                cache.state["key_blocked"][:, : past + n] = key_blocked
            return key_blocked
        if cache is not None and "key_blocked" in cache.state:
            cache.state["key_blocked"][:, past : past + n] = False
            return cache.state["key_blocked"][:, : past + n]
        return None

    def _prefix(
        self, cache: KVCache | None, batch_size: int, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, ...]] | None:
        if not self.config.pre_seq_len:
            return None
        if cache is not None and "prefix" in cache.state:
            return cache.state["prefix"]
        cfg = self.config
        kv = prefix_key_values(
            self.prefix_encoder, cfg.num_layers, cfg.kv_heads, cfg.kv_channels, dtype, batch_size, self.training
        )
        devices = [layer.input_layernorm.weight.device for layer in self.encoder.layers]
        kv = [(k.to(dev), v.to(dev)) for (k, v), dev in zip(kv, devices, strict=True)]
        if cache is not None:
            cache.state["prefix"] = kv
        return kv


def full_attention_blocked(
    n: int, past: int, key_blocked: torch.Tensor | None, prefix_length: int, device: torch.device
) -> torch.Tensor | None:
    """The reference ``get_masks``: ``[b, 1, n, prefix+past+n]`` True where a query may not attend, or
    None where causal attention with the queries aligned to the last keys (or, for one query, no mask)
    gives the same: nothing padded, and at most ``n`` keys before the queries (past that, padding the
    queries in front, as the attention does, would cost more than the mask saves).

    Queries see the prefix, the cache and themselves causally, never padding keys; on a first pass
    (nothing before the tokens) a padding query sees everything, as in the reference (its output is
    never used, but the reference computes it that way).
    """
    before = prefix_length + past
    if key_blocked is None:
        if n == 1 or before <= n:
            return None
        return causal_blocked(n, before, None, device)
    if prefix_length:
        key_blocked = F.pad(key_blocked, (prefix_length, 0), value=False)
    blocked = causal_blocked(n, before, key_blocked, device)
    if before == 0:
        blocked = blocked & ~key_blocked[:, None, :, None]
    return blocked


class ChatGLM2ForConditionalGeneration(nn.Module):
    """ChatGLM2-6B / ChatGLM3-6B / CharacterGLM-6B with its output layer."""

    supports_prefix_reuse = True
    ignored_checkpoint_keys = re.compile(r"transformer\.rotary_pos_emb\.inv_freq")  # recomputed, as the reference does

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        unsupported = [
            name
            for name, ok in (
                ("apply_residual_connection_post_layernorm", not config.apply_residual_connection_post_layernorm),
                ("fp32_residual_connection", not config.fp32_residual_connection),
                ("original_rope=false", config.original_rope),
            )
            if not ok
        ]
        if unsupported:
            raise GlmkitError(f"ChatGLM2 settings not supported: {', '.join(unsupported)}")
        self.config = config
        self.transformer = ChatGLMModel(config)
        self.context_length = config.seq_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        ptuning_checkpoint: str | Path | None = None,
        num_gpus: int = 1,
        quantize: QuantizationSpec | None = None,
    ) -> ChatGLM2ForConditionalGeneration:
        """Load an official checkpoint directory; ``num_gpus > 1`` spreads the layers over GPUs 0..N-1;
        ``quantize`` quantizes a float checkpoint's decoder linears on the way (see ``load_pretrained``)."""
        devices = gpu_devices(device, num_gpus)
        return load_pretrained(cls, ChatGLM2Config, path, dtype, devices, ptuning_checkpoint, quantize)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    @property
    def device(self) -> torch.device:
        return self.transformer.embedding.word_embeddings.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        cfg = self.config
        dtype = self.transformer.embedding.word_embeddings.weight.dtype
        return allocate_cache(self.blocks, batch_size, cfg.kv_heads, max_length, cfg.kv_channels, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]``.

        ``attention_mask``: ``[b, past+s]``, 1 = token, 0 = (left) padding.  ``position_ids``: ``[b, s]``;
        without them positions count from the cache's start (plus the offset of positions given earlier).
        ``lengths``: rows padded on the right, see ``models/base.py``.
        """
        h = self.transformer(input_ids, attention_mask, position_ids, cache)
        if last_only:
            h = last_tokens(h, lengths)
        return CausalLMOutput(logits=self.transformer.output_layer(h))

    def decode_rows(
        self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """One new token for each of several sequences stored in rows of ``cache`` (the engine's decode step).

        ``input_ids`` ``[n, 1]``; row ``rows[i]`` (row ``i`` when ``rows`` is None) holds ``positions[i]``
        tokens, filled by ``forward`` on ``cache.row(rows[i])`` without ``attention_mask`` or ``position_ids``
        (so a token's position is its index in the row), and the new token goes to index ``positions[i]``,
        which must lie inside the cache.  A P-Tuning prefix is seen by every row, as in ``forward``.  Shapes
        depend only on ``n`` and the cache, never on the positions, and nothing waits for the device.
        Returns next-token logits ``[n, vocab]``; the caller keeps the lengths.
        """
        h = self.transformer.decode_rows(input_ids, cache, rows, positions)
        return self.transformer.output_layer(h)[:, -1]
