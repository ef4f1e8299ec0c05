"""Put a fine-tuned adapter over a loaded network: a peft LoRA adapter folder or a P-Tuning v2 checkpoint,
told apart by their files (``adapter_config.json`` / ``transformer.prefix_encoder.*`` tensors).

Adapter tensor names are the official module paths (``base_model.model.transformer.encoder.layers.0.
self_attention.query_key_value.lora_A.weight``), which glmkit's modules carry, so adapters trained on the
official remote-code models load unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models.loading import PREFIX_ENCODER, attach_prefix_encoder, read_ptuning_checkpoint
from glmkit.models.quantize import QuantizedLinear, is_quantized

LORA_CONFIG = "adapter_config.json"


def adapter_kind(path: str | Path) -> str:
    """``lora`` (a peft adapter folder) or ``ptuning`` (a P-Tuning v2 checkpoint folder)."""
    path = Path(path)
    if not path.is_dir():
        raise GlmkitError(f"adapter {path} is not a directory")
    if (path / LORA_CONFIG).is_file():
        return "lora"
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        return "ptuning"
    raise GlmkitError(f"{path} is neither a LoRA adapter (no {LORA_CONFIG}) nor a P-Tuning v2 checkpoint (no weights)")


def peft_target(network: nn.Module) -> nn.Module:
    """The module whose submodule names are the checkpoint's: glmkit's own, or the transformers model
    inside the generic wrapper."""
    from glmkit.models.hf_causal_lm import HFCausalLM

    return network.model if isinstance(network, HFCausalLM) else network


def inject_lora(network: nn.Module, config: Any) -> nn.Module:
    """``get_peft_model`` over ``network``'s own modules, quantized linears included: peft's LoRA layer
    only calls its base layer, so it wraps glmkit's INT8/INT4 linears as it wraps ``nn.Linear`` (the
    base stays frozen; gradients reach the LoRA weights through ``quantized_matmul``)."""
    from peft import get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    config._register_custom_module(dict.fromkeys(QuantizedLinear, LoraLinear))
    with warnings.catch_warnings():  # peft's "Unsupported layer type" for the custom modules registered above
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return get_peft_model(peft_target(network), config)


def apply_adapter(network: nn.Module, path: str | Path, merge: bool = True) -> nn.Module:
    """``network`` with the adapter at ``path``; a LoRA adapter is merged into the weights unless ``merge``
    is False or the weights are quantized (then peft's LoRA layers stay in place, beside the quantized
    linears).  Changes ``network`` in place and returns it."""
    path = Path(path)
    if adapter_kind(path) == "ptuning":
        settings, tensors = read_ptuning_checkpoint(path)
        attach_prefix_encoder(network, **settings)
        encoder = network.transformer.prefix_encoder
        state = {name.removeprefix(PREFIX_ENCODER): t for name, t in tensors.items()}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise GlmkitError(f"{path} does not fit this model's prefix encoder: {exc}") from exc
        return network
    model = load_lora(network, path)
    if merge and not is_quantized(network):
        model.merge_and_unload()  # folds the LoRA layers into the weights, in place
    return network


def load_lora(network: nn.Module, path: Path) -> nn.Module:
    """Inject the LoRA layers an adapter folder describes into ``network`` and load their weights; every
    adapter tensor must find its module.  Returns the peft model (its ``base_model.model`` is the network's
    own module tree)."""
    from peft import LoraConfig, PeftConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(str(path))
    except (ValueError, OSError, TypeError) as exc:
        raise GlmkitError(f"cannot read {path / LORA_CONFIG}: {exc}") from exc
    if not isinstance(config, LoraConfig):
        raise GlmkitError(f"{path} holds a {config.peft_type} adapter; glmkit loads LoRA adapters")
    # task_type CAUSAL_LM (what most adapters say) wraps transformers' generation API, which glmkit's
    # modules do not have and do not need: the plain peft model injects the same layers
    config.task_type, config.inference_mode = None, True
    was_training = network.training
    try:
        model = inject_lora(network, config)
    except ValueError as exc:  # no module of the model matches target_modules
        raise GlmkitError(f"{path} does not fit this model: {exc}") from exc
    network.train(was_training)  # the injected layers (their dropout) start in training mode
    result = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"))
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise GlmkitError(
            f"{path}: adapter tensors and model modules do not match (unexpected {unexpected[:3]}, missing "
            f"{missing[:3]}): was it trained on this model family?"
        )
    return model
