"""Settings, recipes and the mistakes ``glmkit train`` explains in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import V3_DIR, needs_conformance
from safetensors.torch import load_file, save_file
from train_helpers import fit, official_dir, rows_for
from typer.testing import CliRunner

from glmkit.cli import app
from glmkit.errors import GlmkitError
from glmkit.train.args import MethodArgs, TrainingArgs, build_settings, read_config_file
from glmkit.train.commands import setting_groups, train_parameters

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_every_setting_is_a_flag_and_a_config_key():
    flags = {p.name for p in train_parameters().parameters.values()} - {"config"}
    fields = {f.name for group in setting_groups() for f in dataclasses.fields(group)}
    assert flags == fields
    import typer

    command = typer.main.get_command(app).commands["train"]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for name in ("--lora-rank", "--pre-seq-len", "--trainable-modules", "--gradient-checkpointing", "--resume"):
        assert name in options
    assert "--no-gradient-checkpointing" in options


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: ptuning\nlearning_rate: 2e-2\npre_seq_len: 64\nbatch_size: 2\n")
    _, method, training, _ = build_settings(setting_groups(), read_config_file(config), {"batch_size": 8})
    assert (method.method, method.pre_seq_len, training.learning_rate, training.batch_size) == ("ptuning", 64, 0.02, 8)
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(GlmkitError, match=r"unknown settings.*lerning_rate"):
        build_settings(setting_groups(), read_config_file(config), {})
    with pytest.raises(GlmkitError, match="method must be one of"):
        MethodArgs(method="qlora")
    with pytest.raises(GlmkitError, match="precision"):
        TrainingArgs(precision="fp8")


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_are_valid_settings(recipe):
    settings = build_settings(setting_groups(), read_config_file(recipe), {})
    assert settings[1].method in ("lora", "ptuning", "freeze", "full")


def test_recipes_exist():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"adgen_ptuning_chatglm.yaml", "alpaca_lora.yaml", "characterglm_lora.yaml", "freeze.yaml"} <= names


@needs_conformance
def test_non_empty_output_dir_is_refused(tmp_path):
    model_dir = official_dir(tmp_path, "v3")
    rows, pad = rows_for(model_dir, "chatglm3", [("你好", "好")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GlmkitError, match=r"not empty: pass --resume .* --overwrite-output-dir"):
        fit(model_dir, out, rows, pad, max_steps=1)
    assert (out / "notes.txt").read_text() == "mine"
    fit(model_dir, out, rows, pad, max_steps=1, overwrite_output_dir=True)
    assert not (out / "notes.txt").exists() and (out / "adapter_model.safetensors").is_file()


@needs_conformance
def test_nan_loss_stops_with_the_fp16_hint(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(str(V3_DIR / "checkpoint" / "model.safetensors"))
    tensors["transformer.output_layer.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"))
    for f in (V3_DIR / "checkpoint").glob("*.json"):
        (broken / f.name).write_text(f.read_text())
    for f in (V3_DIR / "tokenizer").iterdir():
        (broken / f.name).symlink_to(f)
    rows, pad = rows_for(broken, "chatglm3", [("你好", "好")])
    with pytest.raises(GlmkitError, match=r"loss became nan at step 1.*fp16"):
        fit(broken, tmp_path / "out", rows, pad, max_steps=3)


def test_cli_error_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--output-dir", str(tmp_path / "o"), "--method", "qlora"])
    assert isinstance(result.exception, GlmkitError) and "method must be one of" in str(result.exception)


def test_deepspeed_without_the_package_is_explained(tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    from glmkit.train.trainer import _accelerator

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(GlmkitError, match="pip install deepspeed"):
        _accelerator(TrainingArgs(deepspeed=str(tmp_path / "ds.json"), device="cpu"), "lora", "fp32", "chatglm2")
