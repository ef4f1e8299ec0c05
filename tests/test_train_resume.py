"""``glmkit train`` killed with SIGKILL and resumed ends at the weights of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_conformance
from safetensors.torch import load_file
from train_helpers import official_dir
from typer.testing import CliRunner

from glmkit.cli import app
from glmkit.models.adapters import adapter_kind
from glmkit.train.checkpoints import STATE, list_checkpoints

pytestmark = needs_conformance
SRC = Path(__file__).resolve().parents[1] / "src"


def write_data(path: Path) -> Path:
    pairs = [("你好", "很高兴认识你"), ("再见", "下次见"), ("谢谢", "不客气"), ("早上好", "早上好呀")]
    path.write_text("".join(json.dumps({"prompt": q, "response": a}, ensure_ascii=False) + "\n" for q, a in pairs))
    return path


def train_args(model_dir: Path, data: Path, output_dir: Path) -> list[str]:
    # dropout on, a warm-up and a decaying rate: RNG, scheduler and optimizer state all have to come back
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(output_dir),
        "--method", "lora", "--lora-dropout", "0.2", "--batch-size", "2", "--max-steps", "24",
        "--save-steps", "4", "--save-total-limit", "3", "--warmup-ratio", "0.2", "--learning-rate", "5e-3",
        "--logging-steps", "1", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip


def run_in_process(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    data = write_data(tmp_path / "data.jsonl")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_in_process(train_args(model_dir, data, reference))

    env = os.environ | {"PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmkit", *train_args(model_dir, data, killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list_checkpoints(killed) or list_checkpoints(killed)[-1][0] < 8:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it really stopped before the end

    for _, checkpoint in list_checkpoints(killed):  # every listed checkpoint is whole
        assert adapter_kind(checkpoint) == "lora"
        assert load_file(str(checkpoint / "adapter_model.safetensors"))
        assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json"} <= {
            p.name for p in (checkpoint / STATE).iterdir()
        }

    run_in_process([*train_args(model_dir, data, killed), "--resume"])
    ours = load_file(str(killed / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert len(list_checkpoints(killed)) <= 3  # save_total_limit

    def losses(directory: Path) -> dict[int, float]:
        lines = (directory / "trainer_log.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    assert losses(killed).keys() == losses(reference).keys() == set(range(1, 25))
    assert losses(killed) == pytest.approx(losses(reference), abs=1e-6)
    run = json.loads((killed / "run.json").read_text())
    assert run["resolved"]["resumed_from_step"] >= 8 and len(run["data_files"]["data"]["sha256"]) == 64
    assert (killed / "training_loss.png").stat().st_size > 0

    chat = CliRunner().invoke(
        app, ["chat", "--model", str(model_dir), "--adapter", str(killed), "-q", "你好", "--temperature", "0",
              "--max-new-tokens", "4", "--device", "cpu"],
    )  # fmt: skip
    assert chat.exit_code == 0, (chat.output, chat.exception)


def test_resume_with_other_batch_settings_is_refused(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    data = write_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    args = train_args(model_dir, data, out)
    args[args.index("--max-steps") + 1] = "5"
    run_in_process(args)
    changed = [*args, "--resume"]
    changed[changed.index("--batch-size") + 1] = "1"
    result = CliRunner().invoke(app, changed)
    assert "global_batch" in str(result.exception)
