"""Build a model and its tokenizer from a checkpoint directory, choosing the family from config fields.

``architectures`` and ``auto_map`` are not trusted and no ``.py`` file of a checkpoint is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glmkit.errors import GlmkitError, first_line
from glmkit.models.quantize import DEFAULT_GROUP_SIZE, QuantizationSpec

# sizes that every family reads from config.json; each, where present, must be a positive whole number
# (null is left to the family for the optional ones, and refused for the sizes every network needs)
_REQUIRED_WHEN_PRESENT = ("hidden_size", "num_hidden_layers", "num_layers", "num_attention_heads", "vocab_size")
_SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "ffn_hidden_size",
    "inner_hidden_size",
    "kv_channels",
    "multi_query_group_num",
    "vocab_size",
    "padded_vocab_size",
    "max_position_embeddings",
    "seq_length",
    "max_sequence_length",
)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any other content is the user's error, said in one line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmkitError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise GlmkitError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise GlmkitError(f"{model_dir} has no config.json: is it a model directory?")
    config = read_json_object(path)
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise GlmkitError(f"{path}: model_type must be a string, not {model_type!r}")
    for name in _SIZE_FIELDS:
        value = config.get(name, 1)
        if value is None and name not in _REQUIRED_WHEN_PRESENT:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GlmkitError(f"{path}: {name} must be a positive whole number, not {value!r}")
    return config


CHATGLM_FAMILIES = ("chatglm", "chatglm2")


def model_family(config: dict[str, Any]) -> str:
    """``chatglm`` (ChatGLM-6B), ``chatglm2`` (ChatGLM2/3-6B, CharacterGLM-6B, GLM-4-9B and its -hf
    copies), ``llama`` or ``hf`` (any other transformers causal LM, GLM-4-0414 among them)."""
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    if "multi_query_attention" in config or "padded_vocab_size" in config:
        return "chatglm2"
    if config.get("model_type") == "glm":  # GLM-4 -hf: the same network under transformers' names
        return "chatglm2"
    from glmkit.models.llama import supports_natively

    return "llama" if supports_natively(config) else "hf"


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    ptuning_checkpoint: str | Path | None = None,
    num_gpus: int = 1,
    quantize: int | None = None,
    group_size: int | None = None,
):
    """A model module following ``glmkit.models.base.CausalLM``, in eval mode on ``device``.

    ``num_gpus > 1`` spreads a ChatGLM model's layers over GPUs 0..N-1 (embeddings and head on the first).
    ``quantize`` (4 or 8) quantizes the decoder linears of a float checkpoint while loading (INT4 in groups
    of ``group_size`` inputs); quantized checkpoints (``glmkit quantize``, official ChatGLM INT4/INT8) load
    quantized without it.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family = model_family(config)
    device = torch.device(device)
    spec = QuantizationSpec(quantize, group_size or DEFAULT_GROUP_SIZE) if quantize else None
    if group_size and not quantize:
        raise GlmkitError("a group size applies to --quantize 4 only")
    if family in ("hf", "llama") and ptuning_checkpoint is not None:
        raise GlmkitError("P-Tuning checkpoints apply to ChatGLM-family models only")
    if family in ("hf", "llama") and num_gpus > 1:
        raise GlmkitError("splitting a model over several GPUs (num_gpus) is available for ChatGLM models only")
    if family == "llama":
        from glmkit.models.llama import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(model_dir, config, dtype=dtype, device=device, quantize=spec)
    if family == "hf":
        from glmkit.models.hf_causal_lm import HFCausalLM

        return HFCausalLM.from_pretrained(model_dir, config, dtype=dtype, device=device, quantize=spec)
    if family == "chatglm":
        from glmkit.models.chatglm import ChatGLMForConditionalGeneration as family_class
    else:
        from glmkit.models.chatglm2 import ChatGLM2ForConditionalGeneration as family_class
    return family_class.from_pretrained(
        model_dir, dtype=dtype, device=device, ptuning_checkpoint=ptuning_checkpoint, num_gpus=num_gpus, quantize=spec
    )


def load_tokenizer(tokenizer_dir: str | Path):
    """ChatGLM sentencepiece and GLM-4 tiktoken tokenizers natively; anything else through ``AutoTokenizer``
    (no remote code)."""
    from glmkit.models.tokenization_glm4 import is_tiktoken_ranks

    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "ice_text.model").is_file():
        from glmkit.models.tokenization_chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    tokenizer_class = read_json_object(tokenizer_config).get("tokenizer_class") if tokenizer_config.is_file() else None
    if tokenizer_class is not None and not isinstance(tokenizer_class, str):
        raise GlmkitError(f"{tokenizer_config}: tokenizer_class must be a string, not {tokenizer_class!r}")
    vocab_file = tokenizer_dir / "tokenizer.model"
    named = (tokenizer_class or "").lower()
    if vocab_file.is_file() and (named == "chatglm4tokenizer" or is_tiktoken_ranks(vocab_file)):
        from glmkit.models.tokenization_glm4 import GLM4Tokenizer

        return GLM4Tokenizer.from_pretrained(tokenizer_dir)
    if vocab_file.is_file() and named == "chatglmtokenizer":
        from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

        return ChatGLM2Tokenizer.from_pretrained(tokenizer_dir)
    has_tokenizer_json = (tokenizer_dir / "tokenizer.json").is_file()  # -hf checkpoints ship this one
    if (
        not has_tokenizer_json
        and (tokenizer_dir / "config.json").is_file()
        and model_family(read_config(tokenizer_dir)) in CHATGLM_FAMILIES
    ):
        raise GlmkitError(
            f"{tokenizer_dir} is a ChatGLM checkpoint without its tokenizer: it needs ice_text.model (ChatGLM-6B) "
            "or tokenizer.model with tokenizer_config.json (ChatGLM2/3, CharacterGLM, GLM-4)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise GlmkitError(f"cannot load a tokenizer from {tokenizer_dir}: {first_line(exc)}") from exc
