"""Read checkpoint tensors by name: safetensors files or sharded ``pytorch_model*.bin``, never pickled code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from glmkit.errors import GlmkitError
from glmkit.progress import reporter


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors over .bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise GlmkitError(f"{model_dir}: {index_name} names shards that are missing: {missing}")
            return [model_dir / s for s in shards]
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise GlmkitError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the given files, one shard in memory at a time;
    the reporter shows a bar over the files' bytes."""
    total = sum(path.stat().st_size for path in files if path.is_file())
    with reporter().task("Loading weights", total=total, unit="B") as advance:
        for path in files:
            try:
                if path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt") as f:
                        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                            tensor = f.get_tensor(name)
                            advance(tensor.nbytes)
                            yield name, tensor
                else:
                    for name, tensor in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                        advance(tensor.nbytes)
                        yield name, tensor
            except GlmkitError:
                raise
            except Exception as exc:  # corrupt or truncated file: say which one
                raise GlmkitError(f"cannot read weights from {path}: {exc}") from exc


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(checkpoint_files(model_dir)))
