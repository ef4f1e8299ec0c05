"""Two gloo processes (torchrun on CPU) train as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_conformance
from safetensors.torch import load_file
from test_train_resume import SRC, run_in_process, write_data
from train_helpers import official_dir

pytestmark = needs_conformance


def args(model_dir: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    # no dropout: each process draws its own masks, one process draws them for the whole batch
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--method", "lora",
        "--lora-dropout", "0", "--batch-size", str(batch_size), "--gradient-accumulation-steps", "2",
        "--max-steps", "4", "--learning-rate", "1e-2", "--logging-steps", "1", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    data = write_data(tmp_path / "data.jsonl")
    data.write_text(data.read_text() * 2)  # 8 rows: one global batch of 2 x 2 x 2
    run_in_process(args(model_dir, data, tmp_path / "one", batch_size=2))

    env = os.environ | {"PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "-m", "glmkit", *args(model_dir, data, tmp_path / "two", batch_size=1)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["resolved"]["world_size"] == 2 and run["resolved"]["global_batch"] == 4
