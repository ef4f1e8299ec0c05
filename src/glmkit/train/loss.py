"""The training loss: next-token cross-entropy over labelled positions (labels -100 carry none).

Only the labelled positions are cast to float32: the loss needs full precision there, while upcasting
the whole ``[batch, seq, vocab]`` logits would cost 4 bytes per vocabulary entry of every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed loss of predicting ``labels[:, t+1]`` from ``logits[:, t]`` where the label is not -100."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()
    return F.cross_entropy(picked, targets[keep], reduction="sum")


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many positions ``token_loss_sum`` counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
