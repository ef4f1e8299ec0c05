"""The Triton kernels of INT8 linears on CUDA (models/int8_kernels.py) against the weights they stand for,
at every batch size a decode step, a scheduler step and a prefill gives them; and quantized models
decoding through the compiled, graphed step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_decode import GREEDY, PROMPT, tiny_chatglm2
from torch import nn

from glmkit.engine import generate_tokens
from glmkit.models.quantize import Int8Linear, quantize_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = (1, 2, 5, 16, 64, 200, 256, 300)  # one row, tensor-core tiles, more than MAX_KERNEL_ROWS


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("inputs", [1000, 1002])  # 1002: rows of the weight not whole 32-bit words
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@torch.inference_mode()
def test_int8_kernel_matches_its_weights(rows, dtype, inputs):
    torch.manual_seed(rows)
    linear = nn.Linear(inputs, 328, device="cuda", dtype=dtype)  # sizes off every block size
    module = Int8Linear.from_linear(linear)
    x = torch.randn(rows, inputs, device="cuda", dtype=dtype)
    want = F.linear(x.float(), module.dequantize(torch.float32), linear.bias.float())
    assert relative_error(module(x), want) < 5e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_graphed_step_over_the_kernels_gives_the_eager_tokens(monkeypatch, bits):
    # float32 activations: near-ties of bf16 logits would flip between the eager and compiled kernels
    model = quantize_model(tiny_chatglm2().to("cuda"), bits)
    monkeypatch.setenv("GLMKIT_DECODE", "eager")
    eager = generate_tokens(model, PROMPT, GREEDY)
    monkeypatch.setenv("GLMKIT_DECODE", "compiled")
    assert generate_tokens(model, PROMPT, GREEDY) == eager and len(set(eager)) > 3
