"""``glmkit train``: flags made from the settings dataclasses, YAML recipes, several-process launch."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from glmkit.errors import GlmkitError
from glmkit.train.args import MethodArgs, ModelArgs, TrainingArgs, build_settings, check_together, read_config_file


def setting_groups() -> tuple[type, ...]:
    from glmkit.train.data import DataArgs  # PART A's data settings

    return (ModelArgs, MethodArgs, TrainingArgs, DataArgs)


def field_parameters(group: type, unset_defaults: bool = False) -> list[inspect.Parameter]:
    """One keyword parameter a field of the dataclass ``group``, as a typer ``--field-name`` option with
    the field's type and ``metadata["help"]``.  ``unset_defaults``: every default is None ("not given",
    so that a config file's value stands) and the real default is shown in the help instead."""
    hints = typing.get_type_hints(group)
    params = []
    for f in fields(group):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help")
        if not unset_defaults:
            annotation, default = Annotated[hints[f.name], typer.Option(flag, help=help_text)], f.default
        else:
            base = _plain_type(hints[f.name])
            default = f.default if f.default is not MISSING else None
            if base is bool:
                option = typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text or "")
            else:
                shown = f" [default: {default}]" if default is not None else ""
                option = typer.Option(flag, help=(help_text or "") + shown)
            annotation, default = Annotated[base | None, option], None
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def train_parameters() -> inspect.Signature:
    """One ``--flag`` per field of every settings group (default None: "not given", so a config file's
    value stands), plus ``--config``."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(help="YAML recipe with the same keys; flags override it.")],
        )
    ]
    seen: set[str] = set()
    for group in setting_groups():
        for param in field_parameters(group, unset_defaults=True):
            if param.name in seen:
                raise GlmkitError(f"setting {param.name} is defined by two groups")
            seen.add(param.name)
            params.append(param)
    return inspect.Signature(params)


def _plain_type(hint: Any) -> type:
    """``int | None`` -> int."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def run_train(values: dict[str, Any]) -> None:
    config = values.pop("config", None)
    file_values = read_config_file(config) if config else {}
    groups = setting_groups()
    settings = build_settings(groups, file_values, values)
    model_args, method_args, training, data_args = settings
    check_together(model_args, method_args, training)
    if training.num_gpus > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch(training.num_gpus))
    train_from_files(model_args, method_args, training, data_args, settings)


def relaunch(num_processes: int) -> int:
    """Run this same command as ``num_processes`` processes through ``accelerate launch`` (one per GPU);
    the processes see WORLD_SIZE and do not launch again."""
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < num_processes:
        raise GlmkitError(
            f"--num-gpus {num_processes}: this machine has {found} CUDA GPU(s); lower --num-gpus, or start CPU "
            f"processes yourself: torchrun --nproc_per_node {num_processes} -m glmkit train ..."
        )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
        "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "glmkit", *sys.argv[1:],
    ]  # fmt: skip
    return subprocess.call(command)


def train_from_files(model_args: ModelArgs, method_args: MethodArgs, training: TrainingArgs, data_args: Any,
                     settings: list[Any]) -> None:  # fmt: skip
    """Tokenize ``training.data`` with the model's tokenizer and template, then train."""
    from glmkit.train.data import DataCollator, load_examples, load_tokenizer_and_template, tokenize_examples
    from glmkit.train.trainer import train

    if not training.data:
        raise GlmkitError("--data is required: the training file")
    examples = load_examples(training.data, data_args)  # a bad row stops here, before any model is loaded
    tokenizer, template = load_tokenizer_and_template(model_args.model, data_args, source=model_args.source)
    rows = tokenize_examples(examples, tokenizer, template, data_args)
    if examples.skipped or rows.stats.dropped:
        typer.echo(
            f"{len(examples.skipped)} bad rows skipped, {len(rows.stats.dropped)} dropped by the limits", err=True
        )
    evaluate_fn = _evaluator(tokenizer, template, training, data_args) if training.eval_data else None
    pad = DataCollator.for_tokenizer(tokenizer).pad_token_id
    result = train(model_args, method_args, training, rows, pad, settings_for_log=settings, evaluate_fn=evaluate_fn)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"trained {result.steps} steps; result in {result.output_dir}")


def _evaluator(tokenizer: Any, template: Any, training: TrainingArgs, data_args: Any):
    """``glmkit eval``'s scoring of ``--eval-data`` on the network being trained (its rows read before training)."""
    from glmkit.chat import ChatModel
    from glmkit.engine import GenerationConfig
    from glmkit.train.data import load_examples
    from glmkit.train.evaluate import evaluate

    examples = load_examples(training.eval_data, data_args)
    config = GenerationConfig(do_sample=False, max_new_tokens=data_args.max_target_length)

    def run(network: Any, step: int) -> dict[str, Any]:
        output = Path(training.output_dir) / f"eval-{step}"
        return evaluate(ChatModel(network, tokenizer, template), examples, data_args, config, output, progress=False)

    return run
