"""What a run leaves beside its result: ``trainer_log.jsonl`` (one line per logged step),
``training_loss.png`` and ``run.json`` (the command, resolved settings, versions, data checksums)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "training_loss.png"
RUN_FILE = "run.json"
_PACKAGES = ("glmkit", "torch", "transformers", "peft", "accelerate", "safetensors")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _command() -> list[str]:
    """The command line as typed: ``glmkit ...`` or ``python -m glmkit ...``."""
    program = Path(sys.argv[0]).name
    head = [Path(sys.executable).name, "-m", "glmkit"] if program == "__main__.py" else [program]
    return [*head, *sys.argv[1:]]


def write_run_file(output_dir: Path, settings: list[Any], extra: dict[str, Any]) -> None:
    data_files = {}
    for group in settings:
        for name in ("data", "eval_data"):
            path = getattr(group, name, None)
            if path and Path(path).is_file():
                data_files[name] = {"path": str(Path(path).resolve()), "sha256": sha256(path)}
    run = {
        "command": _command(),
        "settings": {type(g).__name__: dataclasses.asdict(g) for g in settings},
        "data_files": data_files,
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}},
        **extra,
    }
    (output_dir / RUN_FILE).write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n")


class TrainerLog:
    """Appends one JSON line per logged step; a resumed run first drops the lines past its checkpoint."""

    def __init__(self, output_dir: Path, resume_step: int = 0) -> None:
        self.path = output_dir / LOG_FILE
        kept = []
        if resume_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def plot_loss(log: TrainerLog, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = [r for r in log.records() if "loss" in r]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="training loss", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / PLOT_FILE, dpi=100)
    plt.close(fig)
