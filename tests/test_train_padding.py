"""Training batches are right-padded with an attention mask: each row's logits equal the row alone, and
gradients reach the trained weights (also with gradient checkpointing)."""

from __future__ import annotations

import pytest
import torch
from conftest import CONFORMANCE
from train_helpers import ENGLISH, QUESTION, official_dir, rows_for, tiny_hf_dir

from glmkit.models import load_model
from glmkit.train.batching import pad_rows
from glmkit.train.loss import token_loss_sum
from glmkit.train.methods import enable_gradient_checkpointing

FAMILIES = {"v1": "chatglm", "v3": "chatglm3", "llama": "hf", "qwen": "hf"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad")
    found = {"llama": tiny_hf_dir(root, "llama"), "qwen": tiny_hf_dir(root, "qwen")}
    if CONFORMANCE.is_dir():
        found |= {"v1": official_dir(root, "v1"), "v3": official_dir(root, "v3")}
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_right_padded_rows_equal_rows_alone(dirs, family):
    if family not in dirs:
        pytest.skip(f"conformance data not found at {CONFORMANCE}")
    pairs = [(QUESTION, "好"), (QUESTION + "，今天天气怎么样？", "今天天气很好，适合出门散步")]
    if family in ("llama", "qwen"):
        pairs = [ENGLISH, ("What is the weather like today?", "Sunny and warm, good for a walk.")]
    rows, pad = rows_for(dirs[family], FAMILIES[family], pairs)
    model = load_model(dirs[family])
    batch = pad_rows(rows, pad, torch.device("cpu"))
    assert batch["attention_mask"] is not None
    with torch.no_grad():
        padded = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(padded[i, : len(row["input_ids"])], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["v1", "v3", "llama", "qwen"])
def test_gradient_checkpointing_gives_the_same_gradients(dirs, family):
    if family not in dirs:
        pytest.skip(f"conformance data not found at {CONFORMANCE}")
    question, answer = ENGLISH if family in ("llama", "qwen") else (QUESTION, "好")
    rows, pad = rows_for(dirs[family], FAMILIES[family], [(question, answer)])
    batch = pad_rows(rows, pad, torch.device("cpu"))
    grads = []
    for checkpointing in (False, True):
        model = load_model(dirs[family]).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        token_loss_sum(model(batch["input_ids"]).logits, batch["labels"]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
