"""Checkpoints that a kill at any moment leaves usable: each one is written into a temporary folder and
renamed to ``checkpoint-STEP`` only when complete (a rename is atomic), so every ``checkpoint-*`` folder
is whole.  A checkpoint holds the method's output (adapter, prefix or model, loadable as it is) and
``training_state/``: step, optimizer, scheduler and every process's RNG state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glmkit.errors import GlmkitError

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
TMP_PREFIX = "tmp-"
STATE = "training_state"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def remove_partial(output_dir: Path) -> None:
    """Folders a killed run left half written."""
    for path in output_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    output_dir: Path,
    step: int,
    save_output: Callable[[Path], None],
    trainer_state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    barrier: Callable[[], None],
) -> Path:
    """Every process calls this; process 0 writes the shared parts, each process its RNG state."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE).mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / STATE / f"rng_state_{rank}.pt")
    if rank == 0:
        save_output(tmp)
        torch.save(optimizer.state_dict(), tmp / STATE / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / STATE / "scheduler.pt")
        (tmp / STATE / "trainer_state.json").write_text(json.dumps(trainer_state | {"step": step}, indent=2))
    barrier()
    if rank == 0:
        os.replace(tmp, final)
    barrier()
    return final


def prune(output_dir: Path, keep: int | None) -> None:
    """Remove all but the newest ``keep`` checkpoints (renamed away first, so none is seen half deleted)."""
    if not keep:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        doomed = path.with_name(TMP_PREFIX + "deleted-" + path.name)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_training_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int
) -> dict[str, Any]:
    """Restore optimizer, scheduler and this process's RNG; return the trainer state (with ``step``)."""
    state_dir = checkpoint / STATE
    rng_file = state_dir / f"rng_state_{rank}.pt"
    if not rng_file.is_file():
        raise GlmkitError(f"{checkpoint} was written by fewer processes: resume with the same number of GPUs")
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((state_dir / "trainer_state.json").read_text())
