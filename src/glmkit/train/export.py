"""Write a whole model directory in the original checkpoint format, and merge a LoRA adapter into one.

The directory holds the official tensor names in sharded safetensors (``model-0000i-of-0000n.safetensors``
and ``model.safetensors.index.json``, as transformers writes them), the base model's config.json and
every tokenizer / generation file of the base directory, so glmkit (``--model DIR``) and, for the Llama
family, transformers load it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models import read_config
from glmkit.models.hf_causal_lm import HFCausalLM

# never copied from the base directory: its weights (replaced) and code (glmkit runs none)
_NOT_COPIED = ("*.safetensors", "*.bin", "*.index.json", "*.py", "*.gguf", "*.pt", "*.pth", "*.msgpack", "*.h5")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_SHARD_SIZE = "5GB"


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype a checkpoint's config.json declares (``torch_dtype`` or ``dtype``), if any."""
    config = read_config(model_dir)
    return _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype")))


def copy_model_files(base_dir: Path, out_dir: Path) -> None:
    """config.json, tokenizer and generation files: everything of ``base_dir`` that is not weights or code."""
    for path in base_dir.iterdir():
        if path.is_file() and not any(path.match(pattern) for pattern in _NOT_COPIED):
            shutil.copy2(path, out_dir / path.name)


def save_model_dir(network: nn.Module, base_dir: Path, out_dir: Path, dtype: torch.dtype | None = None) -> None:
    """``network``'s weights (cast to ``dtype`` when given) under their checkpoint names, with the files of
    ``base_dir`` that describe it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_model_files(base_dir, out_dir)
    if isinstance(network, HFCausalLM):
        state = None if dtype is None else {k: v.to(dtype) for k, v in network.model.state_dict().items()}
        network.model.save_pretrained(str(out_dir), state_dict=state, max_shard_size=MAX_SHARD_SIZE)
        return
    state = _unique_tensors(network)
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    write_sharded(state, out_dir)


def _unique_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once: a tied output head is saved under the embedding's name only
    (the loaders tie it back), as transformers saves tied Llama checkpoints."""
    seen: dict[int, str] = {}
    state = {}
    for name, tensor in network.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous().cpu()
    return state


def write_sharded(state: dict[str, torch.Tensor], out_dir: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}  # fmt: skip
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_merged(adapter_dir: Path, out_dir: Path, model: str | None = None, device: str = "cpu") -> Path:
    """Merge the LoRA adapter at ``adapter_dir`` into its base model (``model``, else the adapter's
    ``base_model_name_or_path``) and write the merged model to ``out_dir``, in the base's dtype."""
    from glmkit.hub import resolve_model
    from glmkit.models import load_model
    from glmkit.models.adapters import adapter_kind, apply_adapter

    if adapter_kind(adapter_dir) != "lora":
        raise GlmkitError(
            f"{adapter_dir} is a P-Tuning v2 checkpoint: it has nothing to merge; load it with --adapter instead"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise GlmkitError(f"--output {out_dir} is not empty: choose a new directory")
    base = model or json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise GlmkitError(f"{adapter_dir} does not name its base model: pass --model")
    base_dir = resolve_model(base)
    network = load_model(base_dir, dtype=torch.float32, device=device)  # merge in float32, then cast
    apply_adapter(network, adapter_dir, merge=True)
    save_model_dir(network, base_dir, out_dir, dtype=checkpoint_dtype(base_dir))
    return out_dir
