"""Write a quantized checkpoint directory that ``glmkit.load`` reads directly (no float weights needed).

Layout: ``model.safetensors`` with the quantized modules' state (``Int8Linear``: ``weight`` int8 +
``weight_scale``; ``Int4Linear``: ``weight`` uint8 two per byte + ``scales_and_zeros``), the float tensors
as they were, ``config.json`` with a ``quantization`` section (``{"method": "glmkit-weight-only", "bits",
"group_size"}``) and the tokenizer and generation files copied over.  Checkpoint code (``*.py``) is not copied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmkit.errors import GlmkitError
from glmkit.models.quantize import CONFIG_KEY, DEFAULT_GROUP_SIZE, QuantizationSpec, quantize_model

_NOT_COPIED = ("*.safetensors", "*.bin", "*.index.json", "*.py", "*.gguf", "config.json")


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The float dtype a checkpoint was saved in (fp16/bf16), else float32: scales are kept in it."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def write_quantized_checkpoint(
    model_dir: str | Path, output: str | Path, bits: int, group_size: int | None = None
) -> Path:
    """Quantize the float checkpoint ``model_dir`` on the CPU, block by block, and write it to ``output``."""
    from glmkit.models import load_model, read_config

    model_dir, output = Path(model_dir), Path(output)
    config = read_config(model_dir)
    if QuantizationSpec.from_config(config) is not None:
        raise GlmkitError(f"{model_dir} is already quantized: quantize its float checkpoint")
    if output.resolve() == model_dir.resolve():
        raise GlmkitError("--output must be a new directory, not the model's own")
    if output.exists() and any(output.iterdir()):
        raise GlmkitError(f"{output} exists and is not empty: choose a new directory")
    spec = QuantizationSpec(bits, group_size or DEFAULT_GROUP_SIZE)
    model = load_model(model_dir, dtype=checkpoint_dtype(config), device="cpu")
    quantize_model(model, spec.bits, spec.group_size, pack=False)

    output.mkdir(parents=True, exist_ok=True)
    save_file(_unshared(model.state_dict()), str(output / "model.safetensors"), metadata={"format": "pt"})
    config[CONFIG_KEY] = spec.to_config()
    (output / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in model_dir.iterdir():
        if path.is_file() and not any(path.match(pattern) for pattern in _NOT_COPIED):
            shutil.copy2(path, output / path.name)
    return output


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per storage (tied embeddings and head are saved once, under the first name)."""
    seen: set[int] = set()
    kept = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kept[name] = tensor.contiguous()
    return kept
