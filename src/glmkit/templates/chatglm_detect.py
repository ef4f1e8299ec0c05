"""Which ChatGLM prompt format a checkpoint speaks, from its config and tokenizer files.

ChatGLM2-6B, ChatGLM3-6B and CharacterGLM-6B share one network and one ``tokenizer.model``, and
``architectures`` is not trusted (tiny test checkpoints and real ones disagree), so the names the
checkpoint gives itself decide: ``tokenizer_config.json``'s ``name_or_path``, ``config.json``'s
``_name_or_path`` and ``auto_map`` (read as text, never imported), the directory name. ChatGLM3 is
also recognised by role tokens in its tokenizer_config.json. GLM-4 (the same network) has a vocabulary
of more than 65024 rows, a ``ChatGLM4Tokenizer``, eos id 151329, or, in its ``-hf`` form, ``model_type`` glm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

GLM4_EOS = 151329  # <|endoftext|>, which GLM-4 configs list among their eos ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_chatglm_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    """``"chatglm"``, ``"chatglm2"``, ``"chatglm3"``, ``"characterglm"``, ``"glm4"``, or None when the
    checkpoint is not a ChatGLM-family model or says nothing about which one it is."""
    model_dir = Path(model_dir)
    if "position_encoding_2d" in config or "inner_hidden_size" in config or (model_dir / "ice_text.model").is_file():
        return "chatglm"
    tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
    if config.get("model_type") == "glm":  # a GLM-4 -hf checkpoint: transformers' names for the same network
        return "glm4"
    if not ("multi_query_attention" in config or "padded_vocab_size" in config):
        return None
    # GLM-4 reuses this config layout with a larger (tiktoken) vocabulary and its own chat format.
    eos = config.get("eos_token_id")
    if (
        config.get("padded_vocab_size", 65024) > 65024
        or tokenizer_config.get("tokenizer_class") == "ChatGLM4Tokenizer"
        or GLM4_EOS in (eos if isinstance(eos, list) else [eos])
    ):
        return "glm4"

    auto_map = json.dumps(config.get("auto_map", {}))
    names = [str(tokenizer_config.get("name_or_path", "")), str(config.get("_name_or_path", "")), model_dir.name]
    if any("characterglm" in text.lower() for text in [*names, auto_map]) or any(
        (model_dir / file).is_file() for file in ("characterglm_generation_utils.py", "modeling_characterglm.py")
    ):
        return "characterglm"
    if "<|user|>" in json.dumps(tokenizer_config):  # role tokens listed or used by a chat_template
        return "chatglm3"
    for name in names:  # the tokenizer's own name first: fine-tunes keep it, configs get local paths
        # early chatglm2-6b(-int4) tokenizer configs still said "THUDM/chatglm-6b"
        found = re.search(r"chatglm3|chatglm2|chatglm-6b", name, re.IGNORECASE)
        if found:
            return "chatglm3" if found.group().lower() == "chatglm3" else "chatglm2"
    return None
