"""transformers' model of the same network holding the same weights: what ``glmkit bench`` compares to."""

from __future__ import annotations

from typing import Any

import torch

from glmkit.bench.shapes import Shape

# ChatGLM-6B's network exists in transformers only as the checkpoint's remote code, which glmkit never runs
NO_PEER = {"chatglm": "no transformers class (ChatGLM-6B needs the checkpoint's remote code)"}


def transformers_peer(shape: Shape, model: Any) -> Any | None:
    """transformers' model of ``shape`` with ``model``'s weights, or None where transformers has none."""
    if shape.family in NO_PEER:
        return None
    if shape.family == "llama":
        from transformers import AutoModelForCausalLM

        from glmkit.demo_model import ensure_demo_model

        # the same files glmkit loaded; transformers reads them with its own LlamaForCausalLM
        dtype = next(model.parameters()).dtype
        return AutoModelForCausalLM.from_pretrained(ensure_demo_model(), dtype=dtype).to(model.device).eval()
    return hf_glm(model, shape.config)


def hf_glm(model: Any, config: dict[str, Any]) -> Any:
    """transformers' GlmForCausalLM of a ChatGLM2/3 or GLM-4 shape holding ``model``'s weight tensors
    (views, no copy)."""
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["multi_query_group_num"],
        head_dim=config["kv_channels"], max_position_embeddings=config["seq_length"], rms_norm_eps=1e-5,
        attention_bias=True, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config["rope_ratio"],
                         "partial_rotary_factor": 0.5},
    )  # fmt: skip
    with torch.device("meta"):
        hf = GlmForCausalLM(cfg)
    t = model.transformer
    q = config["num_attention_heads"] * config["kv_channels"]
    kv = config["multi_query_group_num"] * config["kv_channels"]
    state = {"model.embed_tokens.weight": t.embedding.word_embeddings.weight, "model.norm.weight":
             t.encoder.final_layernorm.weight, "lm_head.weight": t.output_layer.weight}  # fmt: skip
    for i, layer in enumerate(t.encoder.layers):
        a, p = layer.self_attention, f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", getattr(a.query_key_value, kind).split([q, kv, kv]), strict=True):
                state[f"{p}self_attn.{name}_proj.{kind}"] = part
        state[p + "self_attn.o_proj.weight"] = a.dense.weight
        state[p + "mlp.gate_up_proj.weight"] = layer.mlp.dense_h_to_4h.weight
        state[p + "mlp.down_proj.weight"] = layer.mlp.dense_4h_to_h.weight
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(model.device):  # its inv_freq buffer, made again (a meta tensor so far)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)
    return hf.eval()
