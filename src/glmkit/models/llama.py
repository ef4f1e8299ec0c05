"""Llama-architecture decoders (Llama 2/3, SmolLM2 -- the bundled demo model), written out in full.

Parameter names match Hugging Face Llama checkpoints (``model.layers.0.self_attn.q_proj.weight``).
Besides the usual one-sequence forward, ``decode_rows`` advances several independent sequences held
in rows of one cache by a token each, every row at its own position: that is what lets the
scheduler decode concurrent requests as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models.base import Block, CausalLMOutput, KVCache, last_tokens
from glmkit.models.loading import check_requested_bits
from glmkit.models.quantize import QuantizationSpec, pack_model, quantize_model, replace_linears
from glmkit.models.weights import load_state_dict


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise GlmkitError(f"Llama rope scaling {rope!r} is not supported natively")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and v is not None}
        values.setdefault("num_key_value_heads", config["num_attention_heads"])
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


def supports_natively(config: dict[str, Any]) -> bool:
    """Plain Llama: model_type llama with default RoPE (scaled variants go through transformers)."""
    if config.get("model_type") != "llama":
        return False
    try:
        LlamaConfig.from_dict(config)
    except (GlmkitError, TypeError, KeyError):
        return False
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[..., dim]`` for integer positions, built in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, heads, seq, dim]``; cos/sin ``[batch, seq, dim]`` (Hugging Face's half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.dim_per_head
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        store: Any,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = store(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, enable_gqa=self.kv_heads != self.heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(Block):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, store) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, store)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    supports_prefix_reuse = True

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.context_length = config.max_position_embeddings
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        config: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
        quantize: QuantizationSpec | None = None,
    ):
        """``quantize``: quantize the decoder linears of a float checkpoint on the CPU, then move them.
        A checkpoint written by ``glmkit quantize`` loads into quantized modules as it is."""
        with torch.device("meta"):
            model = cls(LlamaConfig.from_dict(config))
        saved = QuantizationSpec.from_config(config)
        check_requested_bits(path, saved, quantize)
        if saved is not None:
            replace_linears(model, saved)
        state = load_state_dict(path)
        if model.config.tie_word_embeddings:  # one tensor saved under either name
            head = state.pop("lm_head.weight", None)
            if head is not None:
                state.setdefault("model.embed_tokens.weight", head)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        expected = dict(model.state_dict())
        if model.config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise GlmkitError(
                f"{path}: weights do not fit a Llama model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise GlmkitError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
                )
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        if quantize is not None and saved is None:
            return quantize_model(model, quantize.bits, quantize.group_size, [device]).eval()
        model.to(device)
        if saved is not None:
            pack_model(model)
        return model.eval()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache.allocate(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, max_length, c.dim_per_head,
            self.lm_head.weight.dtype, self.device,
        )  # fmt: skip

    def _run(
        self, input_ids, positions, mask, stores, last_only: bool, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        cos, sin = rope_tables(positions, self.config.dim_per_head, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        for layer, store in zip(self.model.layers, stores, strict=True):
            x = layer(x, cos.to(x.dtype), sin.to(x.dtype), mask, store)
        x = self.model.norm(last_tokens(x, lengths) if last_only else x)
        return self.lm_head(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        batch, seq = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + seq, device=input_ids.device).expand(batch, seq)
        mask = None
        if attention_mask is not None or (cache is not None and start > 0):
            total = start + seq
            causal = torch.ones(seq, total, dtype=torch.bool, device=input_ids.device).tril(start)
            mask = causal[None, None]
            if attention_mask is not None:  # [batch, total] with 0 on padding
                mask = mask & attention_mask[:, None, None, :total].bool()
        if cache is None:
            stores = [lambda k, v: (k, v)] * len(self.model.layers)
        else:
            stores = [lambda k, v, i=i: cache.update(i, k, v) for i in range(len(self.model.layers))]
        logits = self._run(input_ids, position_ids, mask, stores, last_only, lengths)
        if cache is not None:
            cache.advance(seq)
        return CausalLMOutput(logits=logits)

    def decode_rows(
        self, input_ids: torch.Tensor, cache: KVCache, rows: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """One new token for each of several sequences stored in rows of ``cache`` (the engine's decode step).

        ``input_ids`` ``[n, 1]``; row ``rows[i]`` (row ``i`` when ``rows`` is None) holds ``positions[i]``
        tokens before it, and the new token goes to index ``positions[i]``, which must lie inside the cache.
        Shapes depend only on ``n`` and the cache, never on the positions, and nothing waits for the device:
        every row attends over the whole capacity, the mask hiding what lies past its own token.
        Returns next-token logits ``[n, vocab]``; the caller keeps the per-row lengths.
        """
        n = input_ids.shape[0]
        mask = (torch.arange(cache.max_length, device=positions.device)[None] <= positions[:, None])[:, None, None]
        index = torch.arange(n, device=positions.device) if rows is None else rows

        def store(i: int):
            def write_then_read(k: torch.Tensor, v: torch.Tensor):
                # written into the cache tensor itself (a compiler scatters in place; through a view it
                # copies the view back); leading rows are read as a view, no gather
                keys, values = cache.keys[i], cache.values[i]
                keys[index, :, positions] = k[:, :, 0]
                values[index, :, positions] = v[:, :, 0]
                window = cache.max_length  # a window of the cache: only its first positions are read
                if rows is None:
                    return keys[:n, :, :window], values[:n, :, :window]
                return keys[index, :, :window], values[index, :, :window]

            return write_then_read

        stores = [store(i) for i in range(len(self.model.layers))]
        return self._run(input_ids, positions[:, None], mask, stores, last_only=True)[:, -1]
