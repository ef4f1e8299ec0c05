"""The native Llama family against transformers' implementation of the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from glmkit.errors import GlmkitError
from glmkit.models import load_model, model_family
from glmkit.models.llama import LlamaForCausalLM


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=5000.0, tie_word_embeddings=request.param,
    )  # fmt: skip
    reference = HFLlama(config).eval()
    path = tmp_path_factory.mktemp("llama")
    reference.save_pretrained(path)
    return path, reference


def test_native_family_is_chosen_and_matches_transformers(checkpoint):
    path, reference = checkpoint
    model = load_model(path)
    assert isinstance(model, LlamaForCausalLM)
    ids = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(ids, attention_mask=mask, position_ids=positions).logits
        theirs = reference(ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(ours[:, 5:], theirs[:, 5:], atol=1e-5, rtol=1e-5)


def test_cache_and_rows_match_full_recomputation(checkpoint):
    path, _ = checkpoint
    model = load_model(path)
    ids = torch.randint(0, 120, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(ids).logits
        cache = model.new_cache(1, 32)
        pieces = [model(ids[:, :9], cache=cache).logits] + [model(ids[:, i : i + 1], cache=cache).logits for i in
                                                              range(9, 20)]  # fmt: skip
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        rows = model.new_cache(4, 32)
        model(ids[:, :6], cache=rows.row(3))
        model(ids[:, :11], cache=rows.row(1))
        out = model.decode_rows(ids[0, [11, 6]][:, None], rows, torch.tensor([1, 3]), torch.tensor([11, 6]))
        torch.testing.assert_close(out, full[0, [11, 6]], atol=1e-5, rtol=1e-5)


def test_scaled_rope_goes_through_transformers():
    config = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "llama3"}}  # fmt: skip
    assert model_family(config) == "hf"
    assert model_family({**config, "rope_scaling": None}) == "llama"


def test_mismatched_weights_are_a_clear_error(checkpoint, tmp_path):
    path, _ = checkpoint
    import json
    import shutil

    shutil.copytree(path, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["hidden_size"] = 60
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlmkitError, match="shape"):
        load_model(tmp_path / "bad")
