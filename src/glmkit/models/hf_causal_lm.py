"""Any transformers causal LM glmkit has no native family for, driven by glmkit's own decode loop.

Only the module's ``forward`` is used; its ``past_key_values`` object is carried through untouched,
so changes in transformers' cache classes do not reach the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from glmkit.errors import GlmkitError, first_line
from glmkit.models.base import CausalLMOutput
from glmkit.models.quantize import QuantizationSpec, quantize_model


@dataclass
class HFCache:
    max_length: int
    past: Any = None
    length: int = 0

    def crop(self, length: int) -> None:
        # transformers' cache classes changed what ``crop`` means between releases, so shortening
        # starts over; a prompt that extends the cached tokens (the usual next chat turn) still reuses it
        if length < self.length:
            self.past, self.length = None, 0

    def grow(self, max_length: int) -> None:
        self.max_length = max(self.max_length, max_length)  # transformers' caches grow by themselves


class HFCausalLM(nn.Module):
    supports_prefix_reuse = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )

    @classmethod
    def from_pretrained(
        cls,
        path: Path,
        config: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
        quantize: QuantizationSpec | None = None,
    ) -> HFCausalLM:
        """``quantize``: quantize the decoder linears on the CPU (models with ``model.layers``), then move."""
        model_type = config.get("model_type")
        if model_type is None:
            raise GlmkitError(f"{path}/config.json has no model_type: glmkit cannot tell which network it holds")
        if model_type not in CONFIG_MAPPING:
            needs_code = " (its auto_map points to code shipped with the checkpoint, which glmkit never runs)"
            raise GlmkitError(
                f"{path}: model_type {model_type!r} is neither a glmkit family nor known to transformers "
                f"{transformers.__version__}{needs_code if 'auto_map' in config else ''}"
            )
        if QuantizationSpec.from_config(config) is not None:
            raise GlmkitError(
                f"{path} is a quantized checkpoint of a model glmkit runs through transformers: glmkit loads "
                "quantized checkpoints of its native families only; quantize the float checkpoint at load instead"
            )
        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype, trust_remote_code=False)
        except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as exc:
            raise GlmkitError(f"transformers cannot build a causal LM from {path}: {first_line(exc)}") from exc
        if quantize is not None:
            return quantize_model(cls(model.eval()), quantize.bits, quantize.group_size, [device])
        return cls(model.to(device).eval())

    @property
    def blocks(self) -> nn.ModuleList:
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise GlmkitError(
                f"{type(self.model).__name__} keeps its decoder layers elsewhere than model.layers: "
                "glmkit cannot quantize it; load it without --quantize"
            )
        return layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self, batch_size: int, max_length: int) -> HFCache:
        return HFCache(max_length=max_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HFCache | None = None,
        last_only: bool = False,
    ) -> CausalLMOutput:
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if last_only:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            if position_ids is None:
                start = cache.length
                position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
            kwargs["past_key_values"] = cache.past
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        if cache is not None:
            cache.past = out.past_key_values
            cache.length += input_ids.shape[1]
        return CausalLMOutput(logits=out.logits)
