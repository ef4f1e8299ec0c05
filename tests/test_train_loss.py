"""The loss: shifted cross-entropy over labelled positions, in float32 slices, same value and gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit.train import loss


def test_sliced_loss_equals_plain_cross_entropy(monkeypatch):
    monkeypatch.setattr(loss, "SLICE_BYTES", 3 * 4 * 11)  # slices of 3 positions
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, :3] = -100
    labels[1, 5] = -100
    ours = loss.token_loss_sum(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)

    theirs = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_ours, grad_theirs)
    assert loss.labelled_tokens(labels) == 7


def test_no_labelled_token_gives_a_zero_with_a_graph():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    value = loss.token_loss_sum(logits, torch.full((1, 4), -100))
    value.backward()
    assert value.item() == 0 and logits.grad is not None
