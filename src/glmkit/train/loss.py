"""The training loss: next-token cross-entropy over labelled positions (labels -100 carry none).

Only the labelled positions are cast to float32, a slice at a time, and each slice's float32 copy is
recomputed in the backward pass instead of kept: the loss needs full precision, but holding float32
``[tokens, vocab]`` logits (and their softmax) would cost 8 bytes per vocabulary entry of every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glmkit.train.layouts import IGNORE

SLICE_BYTES = 1 << 28  # float32 logits per slice: 256 MiB (1032 positions of a 65024-entry vocabulary)


def _slice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss of predicting ``labels[:, t+1]`` from ``logits[:, t]`` where the label is not -100."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked, wanted = logits[:, :-1][keep], targets[keep]
    if not picked.numel():
        return logits.sum() * 0.0  # nothing labelled: a zero that still has a graph
    if not picked.requires_grad:
        return _slice_loss(picked, wanted)
    positions = max(1, SLICE_BYTES // (4 * picked.shape[-1]))
    slices = zip(picked.split(positions), wanted.split(positions), strict=True)
    return sum(checkpoint(_slice_loss, rows, ids, use_reentrant=False) for rows, ids in slices)


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions ``token_loss_sum`` counts."""
    return int((labels[:, 1:] != IGNORE).sum())
