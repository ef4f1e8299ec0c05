"""The random-weight ChatGLM2/3 network the GPU benchmarks share (no download needed)."""

from __future__ import annotations

import torch

from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmkit.models.loading import materialize


def random_chatglm2(
    config: ChatGLM2Config, device: torch.device, dtype: torch.dtype, draw_device: torch.device | None = None
) -> ChatGLM2ForConditionalGeneration:
    """glmkit's native network on ``device`` with N(0, 0.02) weights, unit norms and zero biases.

    ``draw_device`` draws the normals elsewhere (a GPU draws 6 billion of them much faster than a CPU),
    one tensor at a time."""
    draw_device = draw_device or device
    with torch.device("meta"):
        model = ChatGLM2ForConditionalGeneration(config)
    model.to(dtype)
    materialize(model, [device])
    generator = torch.Generator(draw_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, generator=generator, device=draw_device, dtype=dtype) * 0.02).to(device))
    return model.eval()
