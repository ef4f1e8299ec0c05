"""Building blocks of the training tests: tiny model directories of each family and tokenized rows.

Rows are built here directly (prompt through the model's template, masked with -100; the answer and eos
carry the loss), so these tests do not depend on the data module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import CONFORMANCE

from glmkit.models import load_tokenizer
from glmkit.templates import get_template
from glmkit.train.args import MethodArgs, ModelArgs, TrainingArgs
from glmkit.train.trainer import TrainResult, train

QUESTION, ANSWER = "你好", "好的"
ENGLISH = ("Hello", "Nice to meet you.")  # few tokens for the demo tokenizer (Chinese is bytes there)
TEMPLATES = {"v1": "chatglm", "v1-learnable": "chatglm", "v3": "chatglm3", "llama": "hf", "qwen": "hf", "demo": "hf"}


def pair(family: str) -> tuple[str, str]:
    """The one example a test teaches: short for the family's tokenizer."""
    return (QUESTION, ANSWER) if family.startswith(("v1", "v3")) else ENGLISH


def official_dir(root: Path, version: str) -> Path:
    """A conformance checkpoint with its real tokenizer beside it, as the hub repos ship them."""
    folder = root / version
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("checkpoint", "tokenizer"):
        for f in (CONFORMANCE / f"chatglm_{version}" / part).iterdir():
            (folder / f.name).symlink_to(f)
    return folder


def learnable_v1_dir(root: Path) -> Path:
    """The conformance ChatGLM-6B with a larger output scale (embeddings x5, final norm weight 1): the
    recorded one maps every hidden state to nearly uniform logits (final norm weights ~0.1), so no adapter
    could make it prefer an answer in a few steps."""
    from safetensors.torch import load_file, save_file

    folder = root / "v1-learnable"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(CONFORMANCE / "chatglm_v1" / "checkpoint" / "model.safetensors"))
    for name in ("transformer.word_embeddings.weight", "lm_head.weight"):
        tensors[name] = tensors[name] * 5
    tensors["transformer.final_layernorm.weight"] = torch.ones_like(tensors["transformer.final_layernorm.weight"])
    save_file(tensors, str(folder / "model.safetensors"))
    for part in ("checkpoint", "tokenizer"):
        for f in (CONFORMANCE / "chatglm_v1" / part).iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).symlink_to(f)
    return folder


def tiny_hf_dir(root: Path, kind: str) -> Path:
    """A random 2-layer Llama (glmkit's native family) or Qwen2 (through transformers) with the demo
    model's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from glmkit.demo_model import ensure_demo_model

    demo = ensure_demo_model()
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=2, bos_token_id=1,
        tie_word_embeddings=False, initializer_range=0.5,
    )  # fmt: skip
    folder = root / kind
    model_cls(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, folder / name)
    return folder


def rows_for(model_dir: Path, template: str, pairs: list[tuple[str, str]]) -> tuple[list[dict], int]:
    """Tokenized rows and the pad id: the prompt masked, the answer and the end-of-turn id trained."""
    tokenizer = load_tokenizer(model_dir)
    chat_template = get_template(template)
    rows = []
    for question, answer in pairs:
        prompt = chat_template.build_input_ids(tokenizer, [{"role": "user", "content": question}])
        reply = [*tokenizer.encode(answer, add_special_tokens=False), chat_template.stop_token_ids(tokenizer)[0]]
        rows.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return rows, pad


def fit(model_dir: Path, output_dir: Path, rows: list[dict], pad: int, **settings) -> TrainResult:
    """Train in this process on CPU; ``settings`` go to ModelArgs, MethodArgs or TrainingArgs by name."""
    model_fields, method_fields = set(ModelArgs.__dataclass_fields__), set(MethodArgs.__dataclass_fields__)
    method = MethodArgs(**{k: v for k, v in settings.items() if k in method_fields})
    training = TrainingArgs(
        **{"output_dir": str(output_dir), "device": "cpu", "batch_size": 1, "logging_steps": 1}
        | {k: v for k, v in settings.items() if k not in method_fields | model_fields}
    )
    model = ModelArgs(model=str(model_dir), **{k: v for k, v in settings.items() if k in model_fields})
    return train(model, method, training, rows, pad)


@torch.no_grad()
def logits_of(network, ids: list[int]) -> torch.Tensor:
    return network(torch.tensor([ids], device=next(network.parameters()).device)).logits.float()
