"""Adapters trained over a frozen INT8 / INT4 base (``glmkit train --quantize``): gradients reach the
inputs of the quantized linears without a float copy of their weights, the adapter learns, and it
reloads over the same quantized base (``glmkit.load(..., quantize=N, adapter=DIR)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_conformance
from torch import nn
from train_helpers import fit, logits_of, official_dir, pair, rows_for, tiny_hf_dir
from typer.testing import CliRunner

import glmkit
from glmkit.cli import app
from glmkit.errors import GlmkitError
from glmkit.models.quantize import Int4Linear, Int8Linear, QuantizedLinear


def quantized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    return Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 32)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gradients_reach_the_input_without_a_float_weight_kept(kind, packed):
    module = quantized(kind)
    if packed and kind == "int4":
        module.pack()  # the CPU kernel's layout
    weight = module.dequantize(torch.float32)
    x = torch.randn(3, 7, 256, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = module(x)
    out.square().sum().backward()
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, weight, module.bias).square().sum().backward()
    assert torch.allclose(x.grad, reference.grad, rtol=1e-4, atol=1e-5)
    assert weight.shape not in saved and weight.t().shape not in saved  # recomputed in the backward instead


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_over_a_quantized_llama_learns_and_reloads(tmp_path, bits):
    model_dir = tiny_hf_dir(tmp_path / "models", "llama")  # glmkit's native Llama, random weights
    question, answer = pair("llama")
    rows, pad = rows_for(model_dir, "hf", [(question, answer)])
    out = tmp_path / "out"
    result = fit(model_dir, out, rows, pad, method="lora", quantize=bits, learning_rate=1e-2, max_steps=25,
                 lora_dropout=0.0, lr_scheduler="constant")  # fmt: skip
    network = result.prepared.network
    assert any(isinstance(m, QuantizedLinear) for m in network.modules())
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses
    trained = logits_of(network.eval(), rows[0]["input_ids"])

    reloaded = glmkit.load(model_dir, device="cpu", quantize=bits, adapter=out)  # the LoRA layers stay unmerged
    again = logits_of(reloaded.model, rows[0]["input_ids"])
    # the trained network dequantizes for its matmuls, the reloaded one runs the CPU kernels
    assert (again - trained).abs().max() <= 1e-4 * trained.abs().max()
    assert reloaded.chat(question, temperature=0, max_new_tokens=16)[0] == answer
    assert any(isinstance(m, QuantizedLinear) for m in reloaded.model.modules())


@needs_conformance
def test_ptuning_over_an_int4_chatglm3_learns_and_reloads(tmp_path):
    model_dir = official_dir(tmp_path / "models", "v3")
    question, answer = pair("v3")
    rows, pad = rows_for(model_dir, "chatglm3", [(question, answer)])
    out = tmp_path / "out"
    result = fit(model_dir, out, rows, pad, method="ptuning", quantize=4, learning_rate=1.0, max_steps=30,
                 pre_seq_len=8, lr_scheduler="linear")  # fmt: skip
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses
    trained = logits_of(result.prepared.network.eval(), rows[0]["input_ids"])
    reloaded = glmkit.load(model_dir, device="cpu", quantize=4, adapter=out)
    again = logits_of(reloaded.model, rows[0]["input_ids"])
    assert (again - trained).abs().max() <= 1e-4 * trained.abs().max()
    assert reloaded.chat(question, temperature=0, max_new_tokens=16)[0] == answer


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "4", "--method", "full"], "trains --method lora or ptuning, not full"),
        (["--quantize", "4", "--method", "freeze"], "trains --method lora or ptuning, not freeze"),
        (["--quantize", "3"], "quantize must be 4 or 8"),
    ],
)
def test_quantize_with_a_method_it_cannot_train_is_refused_before_loading(tmp_path, flags, message):
    data = tmp_path / "missing.jsonl"  # never read: the settings are checked first
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--output-dir", str(tmp_path / "o"), *flags])
    assert isinstance(result.exception, GlmkitError) and message in str(result.exception), result.output


def test_a_quantized_base_trains_with_eager_layers_unless_compiling_is_asked_for():
    # a compiled layer keeps each dequantized weight for the backward (15.75 against 6.57 GiB for INT4
    # P-Tuning of ChatGLM-6B on an H200), so on CUDA, where layers compile by default, a quantized base does not
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from glmkit.train.args import TrainingArgs
    from glmkit.train.trainer import _compiles

    cuda = SimpleNamespace(device=torch.device("cuda"), distributed_type=DistributedType.NO)
    assert _compiles(TrainingArgs(), cuda) and not _compiles(TrainingArgs(), cuda, quantized=True)
    assert _compiles(TrainingArgs(compile=True), cuda, quantized=True)
