"""GLM-4 ``-hf`` checkpoints (``model_type`` glm, transformers' ``GlmForCausalLM`` names) read into the
native ChatGLM2/GLM-4 network: the config and the tensor names are translated at load, back to what
transformers' ``convert_glm_weights_to_hf.py`` converted them from.

- ``q_proj``/``k_proj``/``v_proj`` are joined by rows into ``query_key_value``; the other names map
  one to one (``o_proj`` → ``dense``, ``gate_up_proj`` → ``dense_h_to_4h``, ...). Names that are
  already official pass through, so a directory glmkit wrote (``glmkit export``) loads too.
- ``rope_theta`` is 10000 × the original ``rope_ratio``. Third-party copies of the glm-4-9b-chat-hf
  config say 10000 where the model was trained with 5,000,000; such a mismatch is refused, with the
  value to write, rather than corrected silently, since the config is the user's file to fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glmkit.errors import GlmkitError

MODEL_TYPE = "glm"

# rope_ratio of official releases, by the sizes their -hf configs keep (layers, hidden, vocabulary, context)
KNOWN_ROPE_RATIOS = {(40, 4096, 151552, 131072): ("THUDM/glm-4-9b-chat", 500)}

_LAYER = r"model\.layers\.(\d+)\."
_RENAMES = [
    (re.compile(r"model\.embed_tokens\.weight"), "transformer.embedding.word_embeddings.weight"),
    (re.compile(_LAYER + r"self_attn\.o_proj\."), r"transformer.encoder.layers.\1.self_attention.dense."),
    (re.compile(_LAYER + r"mlp\.gate_up_proj\."), r"transformer.encoder.layers.\1.mlp.dense_h_to_4h."),
    (re.compile(_LAYER + r"mlp\.down_proj\."), r"transformer.encoder.layers.\1.mlp.dense_4h_to_h."),
    (re.compile(_LAYER + r"(input_layernorm|post_attention_layernorm)\."), r"transformer.encoder.layers.\1.\2."),
    (re.compile(r"model\.norm\."), "transformer.encoder.final_layernorm."),
    (re.compile(r"lm_head\."), "transformer.output_layer."),
]
_QKV = re.compile(_LAYER + r"self_attn\.([qkv])_proj\.(weight|bias)")
_DROPPED = re.compile(r"model\.rotary_emb\..*")  # recomputed, as for the official names


def _rope(config: dict[str, Any], path: Path) -> float:
    """The original ``rope_ratio`` from a -hf config's rope settings (top level or ``rope_parameters``)."""
    rope = {**config, **(config.get("rope_parameters") or config.get("rope_scaling") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GlmkitError(f"{path}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported natively")
    if rope.get("partial_rotary_factor", 0.5) != 0.5:
        raise GlmkitError(f"{path}: partial_rotary_factor must be 0.5 for GLM-4 (RoPE on half of each head)")
    theta = float(rope.get("rope_theta", 10000.0))
    sizes = tuple(config.get(k) for k in ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings"))
    if "rope_ratio" in config:  # kept from the original config by some conversions
        source, original = "its rope_ratio", config["rope_ratio"]
    else:
        source, original = KNOWN_ROPE_RATIOS.get(sizes, (None, None))
    if original is not None and theta != 10000 * original:
        raise GlmkitError(
            f"{path}/config.json: rope_theta is {theta:g}, but {source} means rope_ratio {original:g}, i.e. "
            f"rope_theta {10000 * original:g} (copies of -hf configs carry this mistake): set rope_theta to "
            f"{10000 * original:g}"
        )
    return theta / 10000


def official_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """A -hf config in the official ChatGLM field names (what ``ChatGLM2Config`` reads)."""
    if config.get("hidden_act", "silu") != "silu":
        raise GlmkitError(f"{path}: hidden_act {config['hidden_act']!r} is not GLM-4's silu")
    heads = config["num_attention_heads"]
    official = {
        "padded_vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "kv_channels": config.get("head_dim") or config["hidden_size"] // heads,
        # q, k and v are joined as [all queries | keys | values]: the multi-query layout, whatever the count
        "multi_query_attention": True,
        "multi_query_group_num": config.get("num_key_value_heads") or heads,
        "ffn_hidden_size": config["intermediate_size"],
        "seq_length": config.get("max_position_embeddings", 131072),
        "layernorm_epsilon": config.get("rms_norm_eps", 1.5625e-07),
        "add_qkv_bias": config.get("attention_bias", True),
        "add_bias_linear": config.get("linear_bias", False),
        "rope_ratio": _rope(config, path),
    }
    return {**config, **official}


def official_tensors(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under the official names, q/k/v joined once all three of a layer are read."""
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        if _DROPPED.fullmatch(name):
            continue
        qkv = _QKV.fullmatch(name)
        if qkv is None:
            yield _renamed(name), tensor
            continue
        layer, part, kind = qkv.groups()
        parts = pending.setdefault((layer, kind), {})
        parts[part] = tensor
        if len(parts) == 3:
            del pending[(layer, kind)]
            joined = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            yield f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}", joined
    if pending:
        (layer, kind), parts = next(iter(pending.items()))
        raise GlmkitError(f"layer {layer} has only {'/'.join(sorted(parts))}_proj.{kind} of q/k/v_proj")


def _renamed(name: str) -> str:
    for pattern, official in _RENAMES:
        if pattern.match(name):
            return pattern.sub(official, name, count=1)
    return name
