"""LoRA adapters: official peft names load unchanged, merged equals unmerged, export writes the original
format (transformers loads the Llama one), and the folder kinds are told apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_conformance
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from train_helpers import logits_of, official_dir, tiny_hf_dir
from typer.testing import CliRunner

import glmkit
from glmkit.cli import app
from glmkit.errors import GlmkitError
from glmkit.models import load_model
from glmkit.models.adapters import adapter_kind, peft_target
from glmkit.train.adapters import apply_adapter

PROMPT = [64790, 64792, 36474, 54591, 30910, 13, 54591]  # any ids (ChatGLM2/3 prefix first)
V1_PROMPT = [5, 74874, 130001, 130004]  # "你好" with [gMASK] <sop>


def official_adapter(directory: Path, prefix: str, num_layers: int, shape_in: int, shape_out: int) -> dict:
    """An adapter as peft saved it for the official remote-code models: ``base_model.model.`` + module path,
    task_type CAUSAL_LM, the older ``adapter_model.bin`` file."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(num_layers):
        name = f"base_model.model.{prefix.format(i=i)}.query_key_value"
        tensors[f"{name}.lora_A.weight"] = torch.randn(4, shape_in, generator=generator) * 0.1
        tensors[f"{name}.lora_B.weight"] = torch.randn(shape_out, 4, generator=generator) * 0.1
    directory.mkdir()
    torch.save(tensors, directory / "adapter_model.bin")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
              "target_modules": ["query_key_value"], "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": "THUDM/chatglm-6b"}  # fmt: skip
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return tensors


@needs_conformance
@pytest.mark.parametrize(
    ("version", "prefix", "hidden", "qkv", "prompt"),
    [
        ("v3", "transformer.encoder.layers.{i}.self_attention", 64, 128, PROMPT),  # 4 heads + 2x2 kv heads of 16
        ("v1", "transformer.layers.{i}.attention", 32, 96, V1_PROMPT),
    ],
)
def test_official_peft_names_load_unchanged(tmp_path, version, prefix, hidden, qkv, prompt):
    model_dir = official_dir(tmp_path, version)
    tensors = official_adapter(tmp_path / "adapter", prefix, 2, hidden, qkv)
    tuned = glmkit.load(model_dir, device="cpu", adapter=tmp_path / "adapter")

    by_hand = load_model(model_dir)  # W + alpha / r * B @ A, per layer
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for i in range(2):
            name = f"base_model.model.{prefix.format(i=i)}.query_key_value"
            weight = params[f"{prefix.format(i=i)}.query_key_value.weight"]
            weight += 2.0 * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
    torch.testing.assert_close(logits_of(tuned.model, prompt), logits_of(by_hand, prompt), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits_of(tuned.model, prompt), logits_of(load_model(model_dir), prompt), atol=1e-3)


@needs_conformance
def test_adapter_for_another_family_is_refused(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    official_adapter(tmp_path / "adapter", "transformer.layers.{i}.attention", 2, 64, 128)  # ChatGLM-6B names
    with pytest.raises(GlmkitError, match="do not match"):
        glmkit.load(model_dir, device="cpu", adapter=tmp_path / "adapter")


def random_adapter(model_dir: Path, out: Path, targets: list[str]) -> torch.nn.Module:
    """A LoRA adapter with non-zero B (an untrained one would change nothing); returns the unmerged network."""
    torch.manual_seed(3)
    network = load_model(model_dir)
    peft_model = get_peft_model(
        peft_target(network), LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    )
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return network.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen", "v3"])
def test_export_merges_lora_into_the_original_format(tmp_path, kind):
    if kind == "v3":
        from conftest import CONFORMANCE

        if not CONFORMANCE.is_dir():
            pytest.skip(f"conformance data not found at {CONFORMANCE}")
        model_dir, targets, prompt = official_dir(tmp_path, "v3"), ["query_key_value"], PROMPT
    else:
        model_dir, targets, prompt = tiny_hf_dir(tmp_path, kind), ["q_proj", "v_proj", "o_proj"], [1, 2, 3, 400, 5]
    unmerged = random_adapter(model_dir, tmp_path / "adapter", targets)
    expected = logits_of(unmerged, prompt)

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", "--adapter", str(tmp_path / "adapter"), "--output", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").is_file()
    merged = glmkit.load(out, device="cpu")
    # merging sums in another order: equal up to float32 rounding at the logits' scale (which elements round
    # apart depends on the CPU's kernels: 3.7e-6 of the scale was seen)
    assert (logits_of(merged.model, prompt) - expected).abs().max() <= 3e-5 * expected.abs().max()
    if kind == "llama":  # transformers reads the merged Llama directory as it is
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(torch.tensor([prompt])).logits, expected, atol=1e-4, rtol=1e-4)

    unmerged_again = apply_adapter(glmkit.load(model_dir, device="cpu"), tmp_path / "adapter", merge=False)
    assert torch.equal(logits_of(unmerged_again.model, prompt), expected)


def test_adapter_folders_are_told_apart(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    assert adapter_kind(tmp_path / "lora") == "lora"
    (tmp_path / "ptuning").mkdir()
    save_file(
        {"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 4)},
        str(tmp_path / "ptuning" / "model.safetensors"),
    )
    assert adapter_kind(tmp_path / "ptuning") == "ptuning"
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlmkitError, match="neither a LoRA adapter"):
        adapter_kind(tmp_path / "empty")
    with pytest.raises(GlmkitError, match="P-Tuning"):
        from glmkit.train.export import export_merged

        export_merged(tmp_path / "ptuning", tmp_path / "out")
