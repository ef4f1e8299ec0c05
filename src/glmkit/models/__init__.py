"""Build a model and its tokenizer from a checkpoint directory, choosing the family from config fields.

``architectures`` and ``auto_map`` are not trusted and no ``.py`` file of a checkpoint is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glmkit.errors import GlmkitError
from glmkit.models.quantize import DEFAULT_GROUP_SIZE, QuantizationSpec


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise GlmkitError(f"{model_dir} has no config.json: is it a model directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GlmkitError(f"{path} is not valid JSON: {exc}") from exc


CHATGLM_FAMILIES = ("chatglm", "chatglm2")


def model_family(config: dict[str, Any]) -> str:
    """``chatglm`` (ChatGLM-6B), ``chatglm2`` (ChatGLM2/3-6B, CharacterGLM-6B), ``llama`` or ``hf``
    (any other transformers causal LM)."""
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return "chatglm"
    if "multi_query_attention" in config or "padded_vocab_size" in config:
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

        return HFCausalLM.from_pretrained(model_dir, dtype=dtype, device=device, quantize=spec)
    if family == "chatglm":
        from glmkit.models.chatglm import ChatGLMForConditionalGeneration as family_class
    else:
        from glmkit.models.chatglm2 import ChatGLM2ForConditionalGeneration as family_class
    return family_class.from_pretrained(
        model_dir, dtype=dtype, device=device, ptuning_checkpoint=ptuning_checkpoint, num_gpus=num_gpus, quantize=spec
    )


def load_tokenizer(tokenizer_dir: str | Path):
    """ChatGLM sentencepiece tokenizers natively; anything else through ``AutoTokenizer`` (no remote code)."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / "ice_text.model").is_file():
        from glmkit.models.tokenization_chatglm import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    if (
        (tokenizer_dir / "tokenizer.model").is_file()
        and tokenizer_config.is_file()
        and json.loads(tokenizer_config.read_text(encoding="utf-8")).get("tokenizer_class", "").lower()
        == "chatglmtokenizer"
    ):
        from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

        return ChatGLM2Tokenizer.from_pretrained(tokenizer_dir)
    if (tokenizer_dir / "config.json").is_file() and model_family(read_config(tokenizer_dir)) in CHATGLM_FAMILIES:
        raise GlmkitError(
            f"{tokenizer_dir} is a ChatGLM checkpoint without its tokenizer: it needs ice_text.model (ChatGLM-6B) "
            "or tokenizer.model with tokenizer_config.json (ChatGLM2/3, CharacterGLM)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise GlmkitError(f"cannot load a tokenizer from {tokenizer_dir}: {exc}") from exc
