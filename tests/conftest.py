"""Shared fixtures: the bundled demo model (converted once per machine) and a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# outputs of the official reference code, beside the checkout (never copied into the project)
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
V1_DIR = CONFORMANCE / "chatglm_v1"
V3_DIR = CONFORMANCE / "chatglm_v3"
needs_conformance = pytest.mark.skipif(
    not CONFORMANCE.is_dir(), reason=f"conformance data not found at {CONFORMANCE} (it sits beside the checkout)"
)

# real fine-tuning data (ADGEN rows), beside the checkout like the conformance data
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ADGEN = DATA / "adgen"
needs_data = pytest.mark.skipif(
    not ADGEN.is_dir(), reason=f"fine-tuning data not found at {ADGEN} (it sits beside the checkout)"
)


def load_expected(directory: Path) -> dict:
    """A folder's expected.json, or {} when the data is absent (its tests skip)."""
    path = directory / "expected.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@pytest.fixture(scope="session")
def v1():
    """The real ChatGLM-6B tokenizer (ice_text.model)."""
    from glmkit.models.tokenization_chatglm import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(V1_DIR / "tokenizer")


@pytest.fixture(scope="session")
def v3():
    """The real ChatGLM2/3 tokenizer (tokenizer.model), as chatglm3-6b configures it."""
    from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer.from_pretrained(V3_DIR / "tokenizer")


@pytest.fixture(scope="session")
def v2():
    """The same tokenizer.model, named as chatglm2-6b's tokenizer_config.json names it."""
    from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer.from_pretrained(V3_DIR / "tokenizer", name_or_path="THUDM/chatglm2-6b")


@pytest.fixture(scope="session")
def demo_chat():
    import glmkit

    return glmkit.load(device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    """A random 2-layer Llama driven through glmkit's transformers adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmkit.models.hf_causal_lm import HFCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return HFCausalLM(LlamaForCausalLM(config).eval())
