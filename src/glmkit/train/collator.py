"""Batches of tokenized rows for training: padded on the right, labels padded with -100.

Right padding is what the native models handle without an attention mask: every family's forward is
causal after the prompt, so real tokens never attend to pads that come after them, and pad positions
carry no loss.  ChatGLM-6B in particular must get **no** ``[b, s]`` attention mask with right padding:
its forward reads such a mask as left padding and would shift the positions of every padded row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glmkit.train.layouts import IGNORE


@dataclass
class DataCollator:
    pad_token_id: int
    #: also return ``attention_mask`` (1 = token, 0 = pad); not for ChatGLM-6B (see the module docstring)
    attention_mask: bool = False
    pad_to_multiple_of: int | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **options: Any) -> DataCollator:
        """Pads with the tokenizer's pad id (its eos id, else 0, when it has none: pads carry no loss)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad if pad is not None else 0, **options)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        def padded(row: list[int], value: int) -> list[int]:
            return [*row, *[value] * (width - len(row))]

        batch = {
            "input_ids": torch.tensor([padded(r["input_ids"], self.pad_token_id) for r in rows]),
            "labels": torch.tensor([padded(r["labels"], IGNORE) for r in rows]),
        }
        if self.attention_mask:
            batch["attention_mask"] = torch.tensor([padded([1] * len(r["input_ids"]), 0) for r in rows])
        return batch
