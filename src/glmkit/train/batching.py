"""Which rows each process trains on at each step, and how they become padded tensors.

The order is a function of (seed, epoch) alone, so a resumed run, or a run split over N processes,
sees exactly the batches an uninterrupted single-process run sees: optimizer step ``s`` takes the
global batch ``s`` of a per-epoch permutation, cut into micro-batches and then into per-process shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.errors import GlmkitError
from glmkit.train.collator import DataCollator


@dataclass(frozen=True)
class BatchPlan:
    num_rows: int
    batch_size: int  # per process and micro-step
    accumulation: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        steps = self.num_rows // self.global_batch
        if steps == 0:
            raise GlmkitError(
                f"the data holds {self.num_rows} examples, fewer than one global batch of {self.global_batch} "
                f"(batch_size {self.batch_size} x gradient_accumulation_steps {self.accumulation} x "
                f"{self.world_size} process(es)): lower them or add data"
            )
        return steps

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (0-based), all processes and micro-steps together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[within * self.global_batch : (within + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's rows of each micro-step of ``step``."""
        rows = self.step_rows(step)
        per_micro = self.batch_size * self.world_size
        return [
            rows[m * per_micro + rank * self.batch_size : m * per_micro + (rank + 1) * self.batch_size]
            for m in range(self.accumulation)
        ]


def pad_rows(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor | None]:
    """The data module's right padding (``DataCollator``), on ``device``; ``attention_mask`` is None when
    no row is padded, so the model can use plain causal (flash) attention."""
    batch = DataCollator(pad_id, attention_mask=True)(rows)
    padded = bool((batch["attention_mask"] == 0).any())
    return {
        "input_ids": batch["input_ids"].to(device),
        "labels": batch["labels"].to(device),
        "attention_mask": batch["attention_mask"].to(device) if padded else None,
    }
