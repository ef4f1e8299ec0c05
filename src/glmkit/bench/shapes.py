"""The models ``glmkit bench`` measures: full-size GLM shapes with random weights (no download), a tiny
shape of the same family for ``--quick`` on a CPU, and the bundled demo model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CHATGLM3_6B = {
    "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32,
    "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 128,
    "padded_vocab_size": 65024, "seq_length": 8192, "rope_ratio": 1,
}  # fmt: skip
GLM4_9B = {**CHATGLM3_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072, "rope_ratio": 500}
# THUDM/chatglm-6b's config.json; the conformance checkpoint has the same vocabulary and special ids
CHATGLM_6B = {
    "num_layers": 28, "hidden_size": 4096, "inner_hidden_size": 16384, "num_attention_heads": 32,
    "vocab_size": 130528, "max_sequence_length": 2048, "position_encoding_2d": True,
}  # fmt: skip
# the tiny shapes keep each family's RoPE base and special ids
TINY_CHATGLM2 = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
                 "kv_channels": 16, "padded_vocab_size": 512, "seq_length": 2048}  # fmt: skip
TINY_CHATGLM = {"num_layers": 2, "hidden_size": 64, "inner_hidden_size": 128, "num_attention_heads": 4}


@dataclass(frozen=True)
class Shape:
    """A model to measure: a random-weight GLM config (``family`` chatglm or chatglm2) or the demo model."""

    name: str
    family: str  # chatglm (ChatGLM-6B), chatglm2 (ChatGLM2/3, GLM-4) or llama (the demo model)
    config: dict[str, Any]
    gpu_gb: float = 0.0  # bf16 weights of the full shape: what a CPU cannot hold or run in useful time

    def tiny(self) -> Shape:
        """The same family at a size a CPU runs in seconds (``--quick`` without a GPU)."""
        small = TINY_CHATGLM if self.family == "chatglm" else TINY_CHATGLM2
        return Shape(f"{self.name}-tiny", self.family, {**self.config, **small})


SHAPES = {
    "chatglm3-6b": Shape("chatglm3-6b", "chatglm2", CHATGLM3_6B, 12.5),
    "chatglm-6b": Shape("chatglm-6b", "chatglm", CHATGLM_6B, 12.3),
    "glm4-9b": Shape("glm4-9b", "chatglm2", GLM4_9B, 18.8),
    "demo": Shape("demo", "llama", {}),
}


def model_class(family: str) -> tuple[type, type]:
    """The native module and config classes of a GLM family."""
    if family == "chatglm":
        from glmkit.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        return ChatGLMForConditionalGeneration, ChatGLMConfig
    from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    return ChatGLM2ForConditionalGeneration, ChatGLM2Config


def blank_model(cls: type, config: Any, devices: list[torch.device], dtype: torch.dtype) -> torch.nn.Module:
    """An uninitialised model, its layers spread over ``devices`` as ``num_gpus`` places them."""
    from glmkit.models.loading import materialize

    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)
    materialize(model, devices)
    return model.eval()


def randomize(model: torch.nn.Module, draw_device: torch.device, seed: int = 0) -> None:
    """N(0, 0.02) weights, unit norm weights, zero biases, drawn on ``draw_device`` one tensor at a time
    (a GPU draws billions of normals much faster than a CPU), so a seed gives the same weights anywhere."""
    generator = torch.Generator(draw_device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "layernorm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, device=draw_device, dtype=p.dtype) * 0.02)


def random_model(
    cls: type, config: Any, devices: list[torch.device], dtype: torch.dtype, draw_device: torch.device | None = None
) -> torch.nn.Module:
    """glmkit's native network with random weights (``randomize``), on ``devices``."""
    model = blank_model(cls, config, devices, dtype)
    randomize(model, draw_device or devices[0])
    return model


def build(shape: Shape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The native model of ``shape`` on ``device``: random weights, or the demo model's own."""
    if shape.family == "llama":
        from glmkit.demo_model import ensure_demo_model
        from glmkit.models import load_model

        return load_model(ensure_demo_model(), dtype=dtype, device=device)
    cls, config_class = model_class(shape.family)
    return random_model(cls, config_class.from_dict(shape.config), [device], dtype)


def vocab_size(model: torch.nn.Module) -> int:
    config = model.config
    return getattr(config, "padded_vocab_size", None) or config.vocab_size


def prompt(shape: Shape, length: int, vocab: int, seed: int) -> list[int]:
    """``length`` random ids laid out as the family's prompts are: with random weights which ids they are
    does not change the timing, but ChatGLM-6B's attention needs its [gMASK] <sop> at the end (and no
    other special id, from 130000 up, before them)."""
    high = min(vocab, 130000) if shape.family == "chatglm" else vocab
    ids = torch.randint(100, high - 100, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    if shape.family == "chatglm":
        return [*ids[:-2], 130001, 130004]
    if shape.family == "chatglm2":
        return [64790 % vocab, 64792 % vocab, *ids[2:]]  # [gMASK] sop (folded into a tiny vocabulary)
    return ids
