"""Loading shared by the ChatGLM families: build on the meta device, place layers on one or several
GPUs (as the official ``load_model_on_gpus`` does), fill parameters by checkpoint name, P-Tuning v2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models import glm_hf
from glmkit.models.base import KVCache
from glmkit.models.quantize import (
    QuantizationSpec,
    pack_model,
    quantize_model,
    replace_linears,
    translate_official_int4,
)
from glmkit.models.weights import checkpoint_files, iter_tensors

PREFIX_ENCODER = "transformer.prefix_encoder."


def gpu_devices(device: str | torch.device, num_gpus: int) -> list[torch.device]:
    if num_gpus <= 1:
        return [torch.device(device)]
    if not torch.cuda.is_available() or torch.cuda.device_count() < num_gpus:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise GlmkitError(f"num_gpus={num_gpus} asked for, but this machine has {found} CUDA GPU(s)")
    return [torch.device("cuda", i) for i in range(num_gpus)]


def spread_layers(num_layers: int, devices: list[torch.device]) -> list[torch.device]:
    """The device of each layer, as the official ``load_model_on_gpus`` spreads them: the first device
    also holds the embeddings and the output head, counted as two layers."""
    per_device = (num_layers + 2) / len(devices)
    placement, used, target = [], 2, 0
    for _ in range(num_layers):
        if used >= per_device:
            target, used = min(target + 1, len(devices) - 1), 0
        placement.append(devices[target])
        used += 1
    return placement


def layer_devices(blocks: nn.ModuleList) -> list[torch.device]:
    return [next(block.parameters()).device for block in blocks]


def allocate_cache(
    blocks: nn.ModuleList, batch_size: int, kv_heads: int, max_length: int, head_dim: int, dtype: torch.dtype
) -> KVCache:
    """A static cache whose layer ``i`` lives on the device of block ``i``."""
    shape = (batch_size, kv_heads, max_length, head_dim)
    devices = layer_devices(blocks)
    return KVCache(
        keys=[torch.zeros(shape, dtype=dtype, device=d) for d in devices],
        values=[torch.zeros(shape, dtype=dtype, device=d) for d in devices],
    )


def read_ptuning_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``transformer.prefix_encoder.*`` tensors of a P-Tuning v2 checkpoint and the config values
    they need (``pre_seq_len``, ``prefix_projection``): from its config.json, else from the tensors."""
    tensors = {name: t for name, t in iter_tensors(checkpoint_files(path)) if name.startswith(PREFIX_ENCODER)}
    embedding = tensors.get(PREFIX_ENCODER + "embedding.weight")
    if embedding is None:
        raise GlmkitError(f"{path} holds no {PREFIX_ENCODER}embedding.weight: is it a P-Tuning v2 checkpoint?")
    first_linear = tensors.get(PREFIX_ENCODER + "trans.0.weight")
    settings: dict[str, Any] = {
        "pre_seq_len": embedding.shape[0],
        "prefix_projection": first_linear is not None,
        "prefix_hidden_size": None if first_linear is None else first_linear.shape[0],
    }
    if (path / "config.json").is_file():
        from glmkit.models import read_config

        saved = read_config(path)
        settings.update({k: saved[k] for k in settings if saved.get(k) is not None})
    return settings, tensors


def attach_prefix_encoder(
    model: nn.Module, pre_seq_len: int, prefix_projection: bool = False, prefix_hidden_size: int | None = None
) -> nn.Module:
    """Give a loaded ChatGLM-family model a new P-Tuning v2 prefix encoder (float32, torch's default
    init, on the embeddings' device), replacing any it had; what ``forward`` and the cache see follows."""
    if not hasattr(model.transformer, "build_prefix_encoder"):
        raise GlmkitError("P-Tuning v2 applies to ChatGLM-family models only")
    if pre_seq_len < 1:
        raise GlmkitError(f"pre_seq_len must be at least 1, not {pre_seq_len}")
    config = replace(
        model.config,
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        prefix_hidden_size=prefix_hidden_size if prefix_projection else None,
    )
    model.config = model.transformer.config = config
    with torch.device(model.device):
        model.transformer.prefix_encoder = model.transformer.build_prefix_encoder(config).float()
    return model


def load_pretrained(
    cls: type,
    config_cls: type,
    path: str | Path,
    dtype: torch.dtype,
    devices: list[torch.device],
    ptuning_checkpoint: str | Path | None,
    quantize: QuantizationSpec | None = None,
) -> Any:
    """Build ``cls(config)`` on the meta device, give it memory on ``devices`` and fill it by name from
    the checkpoint (and the P-Tuning checkpoint); every parameter must be found with its shape.
    A GLM-4 ``-hf`` checkpoint (transformers' names) is renamed on the way (``glm_hf``).

    A quantized checkpoint (glmkit's or the official ChatGLM INT4/INT8 format) is loaded into quantized
    modules directly; ``quantize`` quantizes a float one on the CPU, block by block, on the way to ``devices``.
    """
    from glmkit.models import read_config

    path = Path(path)
    raw_config = read_config(path)
    hf_names = raw_config.get("model_type") == glm_hf.MODEL_TYPE
    if hf_names:
        raw_config = glm_hf.official_config(raw_config, path)
    config = config_cls.from_dict(raw_config)
    saved = QuantizationSpec.from_config(raw_config)
    check_requested_bits(path, saved, quantize)
    tensors = iter_tensors(checkpoint_files(path))
    if hf_names:
        tensors = glm_hf.official_tensors(tensors)
    if saved is not None and saved.official and saved.bits == 4:
        tensors = translate_official_int4(tensors)
    sources = [(path, tensors)]
    if ptuning_checkpoint is not None:
        settings, prefix_tensors = read_ptuning_checkpoint(Path(ptuning_checkpoint))
        config = replace(config, **settings)
        sources.append((Path(ptuning_checkpoint), iter(prefix_tensors.items())))
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)
    if config.pre_seq_len:
        model.transformer.prefix_encoder.float()  # as the official P-Tuning scripts run it
    if saved is not None:
        replace_linears(model, saved)
    quantize_later = quantize is not None and saved is None
    materialize(model, [torch.device("cpu")] if quantize_later else devices)

    params = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded: set[str] = set()
    for where, tensors in sources:
        unexpected = []
        for name, tensor in tensors:
            if saved is None and not tensor.is_floating_point():
                raise GlmkitError(
                    f"{where}: {name} is {tensor.dtype} but config.json declares no quantization "
                    "(quantization_bit or a glmkit quantization section): is the config from another checkpoint?"
                )
            if cls.ignored_checkpoint_keys.fullmatch(name):
                continue
            param = params.get(name)
            if param is None:
                unexpected.append(name)
                continue
            if param.shape != tensor.shape:
                raise GlmkitError(
                    f"{where}: {name} has shape {tuple(tensor.shape)}, the config asks for {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(name)
        if unexpected:
            raise GlmkitError(f"{where}: unexpected tensors {_some(unexpected)}: does config.json match the weights?")
    missing = sorted(set(params) - loaded)
    if missing:
        raise GlmkitError(f"{path}: tensors missing from the checkpoint: {_some(missing)}")
    if quantize_later:
        quantize_model(model, quantize.bits, quantize.group_size, devices)
    elif saved is not None:
        pack_model(model)
    return model.eval()


def check_requested_bits(path: Path, saved: QuantizationSpec | None, requested: QuantizationSpec | None) -> None:
    """A quantized checkpoint loads as it is: asking for other bits is a mistake, not a conversion."""
    if saved is not None and requested is not None and requested.bits != saved.bits:
        raise GlmkitError(
            f"{path} is already quantized to {saved.bits} bits; load it without --quantize or with "
            f"--quantize {saved.bits}, or quantize its float checkpoint"
        )


def materialize(model: nn.Module, devices: list[torch.device]) -> None:
    """Give a meta-device model (uninitialised) memory: its blocks spread over ``devices`` as
    ``spread_layers`` says, everything else on the first device."""
    blocks = model.blocks
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    for block, device in zip(blocks, spread_layers(len(blocks), devices), strict=True):
        block.to_empty(device=device)
    for module in model.modules():
        if id(module) not in in_blocks:
            module.to_empty(device=devices[0], recurse=False)


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return f"{shown} (+{len(names) - 5} more)" if len(names) > 5 else shown
