"""Each method on tiny models of each family: the loss falls, the tuned model gives the trained answer
greedily through ``ChatModel.chat``, and what the run wrote reloads to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFORMANCE, needs_conformance
from safetensors.torch import load_file
from train_helpers import TEMPLATES, fit, learnable_v1_dir, logits_of, official_dir, pair, rows_for, tiny_hf_dir

import glmkit
from glmkit.chat import ChatModel
from glmkit.demo_model import ensure_demo_model
from glmkit.models import load_tokenizer
from glmkit.templates import get_template
from glmkit.train.adapters import apply_adapter


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {"llama": tiny_hf_dir(root, "llama"), "qwen": tiny_hf_dir(root, "qwen"), "demo": ensure_demo_model()}
    if CONFORMANCE.is_dir():
        dirs |= {"v1": official_dir(root, "v1"), "v3": official_dir(root, "v3"), "v1-learnable": learnable_v1_dir(root)}
    return dirs


# (family, method, settings, learns): a few steps at a high rate memorise one example.  The recorded tiny
# ChatGLM-6B maps every state to nearly uniform logits, so on it LoRA and P-Tuning are checked for their
# mechanics (loss falls, the output reloads exactly); "v1-learnable" is the same net with a usable output scale.
CASES = [
    ("v3", "lora", {"learning_rate": 1e-2, "max_steps": 25, "lora_dropout": 0.0}, True),
    ("llama", "lora", {"learning_rate": 1e-2, "max_steps": 25, "lora_dropout": 0.0}, True),
    ("qwen", "lora", {"learning_rate": 1e-2, "max_steps": 25, "lora_dropout": 0.0}, True),
    ("demo", "lora", {"learning_rate": 5e-3, "max_steps": 8, "lora_dropout": 0.0}, True),
    ("v1", "lora", {"learning_rate": 1e-2, "max_steps": 4}, False),
    ("v3", "ptuning", {"learning_rate": 1.0, "max_steps": 30, "pre_seq_len": 8, "lr_scheduler": "linear"}, True),
    ("v1", "ptuning", {"learning_rate": 1e-1, "max_steps": 4, "pre_seq_len": 4, "prefix_projection": True}, False),
    ("v3", "freeze", {"learning_rate": 2e-2, "max_steps": 8, "trainable_layers": 1}, True),
    ("v1-learnable", "full", {"learning_rate": 5e-3, "max_steps": 25}, True),
]
GLM = {"v1", "v3", "v1-learnable"}
MERGE_TOLERANCE = 3e-5  # of the logits' largest magnitude


def chat_answer(network, model_dir, family, question) -> str:
    chat_model = ChatModel(network.eval(), load_tokenizer(model_dir), get_template(TEMPLATES[family]))
    return chat_model.chat(question, temperature=0, max_new_tokens=16)[0]


@pytest.mark.parametrize(
    ("family", "method", "settings", "learns"),
    [pytest.param(*c, marks=needs_conformance if c[0] in GLM else (), id=f"{c[0]}-{c[1]}") for c in CASES],
)
def test_method_learns_the_answer_and_reloads(model_dirs, tmp_path, family, method, settings, learns):
    model_dir = model_dirs[family]
    question, answer = pair(family)
    rows, pad = rows_for(model_dir, TEMPLATES[family], [(question, answer)])
    result = fit(model_dir, tmp_path / "out", rows, pad, method=method, **({"lr_scheduler": "constant"} | settings))
    assert result.losses[-1] < (0.1 if learns else 0.98) * result.losses[0], result.losses
    network = result.prepared.network
    if learns:
        assert chat_answer(network, model_dir, family, question) == answer

    prompt = rows[0]["input_ids"]
    trained = logits_of(network.eval(), prompt)
    out = tmp_path / "out"
    if method in ("freeze", "full"):  # a whole model directory in the original format
        reloaded = glmkit.load(out, device="cpu")
        assert torch.equal(logits_of(reloaded.model, prompt), trained)
        assert not list(out.glob("pytorch_model*")) and (out / "config.json").is_file()
    else:
        exact = apply_adapter(glmkit.load(model_dir, device="cpu"), out, merge=False)
        assert torch.equal(logits_of(exact.model, prompt), trained)
        merged = glmkit.load(model_dir, device="cpu", adapter=out)
        # merging sums in another order: equal up to float32 rounding at the logits' scale (which elements
        # round apart depends on the CPU's kernels: up to 1.02e-5 of the scale was seen)
        assert (logits_of(merged.model, prompt) - trained).abs().max() <= MERGE_TOLERANCE * trained.abs().max()
        if learns:
            assert merged.chat(question, temperature=0, max_new_tokens=16)[0] == answer
    if method == "ptuning":  # the official layout: only the prefix encoder, its settings in config.json
        tensors = load_file(str(out / "model.safetensors"))
        assert tensors and all(name.startswith("transformer.prefix_encoder.") for name in tensors)
        config = json.loads((out / "config.json").read_text())
        assert config["pre_seq_len"] == settings["pre_seq_len"]
        assert config["prefix_projection"] == settings.get("prefix_projection", False)
        official = glmkit.load(model_dir, device="cpu", ptuning_checkpoint=out)
        assert torch.equal(logits_of(official.model, prompt), trained)
