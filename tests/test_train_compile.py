"""``--compile``: the decoder layers are compiled during training only, with the eager run's losses."""

from __future__ import annotations

import torch
from conftest import needs_conformance
from torch._dynamo.utils import counters
from train_helpers import fit, logits_of, official_dir, pair, rows_for

from glmkit.train.methods import decoder_layers


@needs_conformance
def test_compiled_layers_train_as_eager_ones(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    question, answer = pair("v3")
    rows, pad = rows_for(model_dir, "chatglm3", [(question, answer), (question + "?", answer + "!")])
    settings = {"method": "lora", "learning_rate": 1e-2, "max_steps": 4, "lora_dropout": 0.0, "batch_size": 2,
                "lr_scheduler": "constant"}  # fmt: skip
    eager = fit(model_dir, tmp_path / "eager", rows, pad, compile=False, **settings)
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(model_dir, tmp_path / "compiled", rows, pad, compile=True, **settings)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled the layers
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)

    network = compiled.prepared.network
    assert all("forward" not in vars(layer) for layer in decoder_layers(network))  # plain layers again
    prompt = rows[0]["input_ids"]
    # four steps at a high rate carry the kernels' rounding differences into the weights
    ours, theirs = logits_of(network.eval(), prompt), logits_of(eager.prepared.network.eval(), prompt)
    assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max()
