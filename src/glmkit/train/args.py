"""Typed settings of a fine-tuning run, one dataclass per group (as LLaMA-Factory's ``hparams/``).

``glmkit train`` builds its flags from these fields and reads the same keys from ``--config run.yaml``
(flags win).  The data settings (``DataArgs``) belong to ``glmkit.train.data``.  This module stays
light (no torch) because the CLI imports it to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError

METHODS = ("lora", "ptuning", "freeze", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAINABLE_MODULES = ("mlp", "attention", "all")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# the attention projections LoRA adapts when --lora-target is not given, by model family
DEFAULT_LORA_TARGETS = {
    "chatglm": ("query_key_value",),
    "chatglm2": ("query_key_value",),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "hf": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
# per method, as the recipes these methods come from use them (THUDM ptuning, ChatGLM-Tuning, LLaMA-Factory)
DEFAULT_LEARNING_RATES = {"lora": 2e-4, "ptuning": 2e-2, "freeze": 5e-5, "full": 1e-5}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GlmkitError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


@dataclass
class ModelArgs:
    model: str | None = field(default=None, metadata=_help("Base model directory or hub id; default: the demo model."))
    source: str = field(default="huggingface", metadata=_help("Where hub ids come from: huggingface or modelscope."))
    quantize: int | None = field(
        default=None,
        metadata=_help("4 or 8: train lora or ptuning over a frozen INT4 / INT8 copy of the base (less memory)."),
    )

    def __post_init__(self) -> None:
        if self.quantize not in (None, 4, 8):
            raise GlmkitError(f"quantize must be 4 or 8, not {self.quantize!r}")


@dataclass
class MethodArgs:
    method: str = field(default="lora", metadata=_help("lora, ptuning (P-Tuning v2), freeze or full."))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank r."))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA alpha (the update is scaled by alpha / r)."))
    lora_dropout: float = field(default=0.1, metadata=_help("Dropout on the LoRA input."))
    lora_target: str | None = field(
        default=None,
        metadata=_help("Comma-separated module names LoRA adapts; default: query_key_value (GLM), q/k/v/o_proj."),
    )
    pre_seq_len: int = field(default=128, metadata=_help("P-Tuning v2 prefix length."))
    prefix_projection: bool = field(default=False, metadata=_help("P-Tuning v2: make the prefix with an MLP."))
    prefix_hidden_size: int | None = field(
        default=None, metadata=_help("Width of the prefix MLP; default: the model's hidden size.")
    )
    trainable_layers: int = field(default=2, metadata=_help("freeze: train the last N layers."))
    trainable_modules: str = field(default="all", metadata=_help("freeze: what of those layers: mlp, attention, all."))

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("trainable_modules", self.trainable_modules, TRAINABLE_MODULES)
        if self.lora_rank < 1 or self.pre_seq_len < 1 or self.trainable_layers < 1:
            raise GlmkitError("lora_rank, pre_seq_len and trainable_layers must be at least 1")

    def lora_targets(self, family: str) -> list[str]:
        if self.lora_target:
            return [name.strip() for name in self.lora_target.split(",") if name.strip()]
        return list(DEFAULT_LORA_TARGETS[family])


@dataclass
class TrainingArgs:
    data: str | None = field(default=None, metadata=_help("Training data file."))
    output_dir: str | None = field(default=None, metadata=_help("Where checkpoints and the result go."))
    learning_rate: float | None = field(
        default=None,
        metadata=_help("Peak learning rate; default per method: lora 2e-4, ptuning 2e-2, freeze 5e-5, full 1e-5."),
    )
    batch_size: int = field(default=4, metadata=_help("Examples per process and micro-step."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-steps per optimizer step."))
    max_steps: int = field(default=0, metadata=_help("Optimizer steps; 0: run --epochs epochs."))
    epochs: float = field(default=3.0, metadata=_help("Passes over the data when --max-steps is 0."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Share of the steps spent warming the rate up."))
    lr_scheduler: str = field(default="linear", metadata=_help("linear, cosine, constant or constant_with_warmup."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip gradients to this norm; 0 turns clipping off."))
    logging_steps: int = field(default=10, metadata=_help("Log loss, learning rate and tokens/s every N steps."))
    save_steps: int = field(default=500, metadata=_help("Write a checkpoint every N steps; 0: only at the end."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep only the newest N checkpoints."))
    gradient_checkpointing: bool | None = field(
        default=None, metadata=_help("Recompute activations in the backward pass; default: on for full, else off.")
    )
    compile: bool | None = field(
        default=None,
        metadata=_help(
            "Compile each decoder layer with torch.compile (faster steps after a warm-up of a minute or two); "
            "default: on for CUDA except sharded (FSDP, DeepSpeed) runs, else off."
        ),
    )
    seed: int = field(default=42, metadata=_help("Seed of the initialisation, dropout and data order."))
    precision: str = field(
        default="auto", metadata=_help("bf16, fp16, fp32 or auto (bf16 or fp16 on CUDA, else fp32).")
    )
    device: str = field(default="auto", metadata=_help("auto or cpu (a launcher picks the GPU of each process)."))
    overwrite_output_dir: bool = field(default=False, metadata=_help("Empty a non-empty --output-dir first."))
    resume: bool = field(default=False, metadata=_help("Continue from the newest checkpoint in --output-dir."))
    num_gpus: int = field(default=1, metadata=_help("Train on N GPUs (launches N processes through accelerate)."))
    deepspeed: str | None = field(default=None, metadata=_help("DeepSpeed config JSON (needs deepspeed installed)."))
    eval_data: str | None = field(
        default=None, metadata=_help("Evaluate on this file at the end (and every --eval-steps).")
    )
    eval_steps: int = field(default=0, metadata=_help("Evaluate every N steps; 0: only at the end."))

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps", "num_gpus"):
            if getattr(self, name) < 1:
                raise GlmkitError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise GlmkitError("max_steps must be >= 0 and epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise GlmkitError(f"warmup_ratio must lie in [0, 1), not {self.warmup_ratio}")

    def learning_rate_for(self, method: str) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[method]

    def checkpointing_for(self, method: str) -> bool:
        return self.gradient_checkpointing if self.gradient_checkpointing is not None else method == "full"


def check_together(model_args: ModelArgs, method_args: MethodArgs, training: TrainingArgs) -> None:
    """Settings of different groups that rule each other out, told before any data or model is read."""
    if model_args.quantize and method_args.method not in ("lora", "ptuning"):
        raise GlmkitError(
            f"--quantize {model_args.quantize} freezes the base in 8 or 4 bits: it trains --method lora or "
            f"ptuning, not {method_args.method}"
        )
    if model_args.quantize and training.deepspeed:
        raise GlmkitError("--quantize and --deepspeed together: DeepSpeed shards float weights; drop one of them")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat ``key: value`` mapping of a recipe YAML file (keys are the flag names with underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise GlmkitError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise GlmkitError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise GlmkitError(f"{path} must hold a mapping of settings (key: value), not {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def build_settings(groups: tuple[type, ...], file_values: dict[str, Any], flag_values: dict[str, Any]) -> list[Any]:
    """One instance per group: defaults, then the config file's values, then the flags given (not None)."""
    known = {f.name for group in groups for f in fields(group)}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise GlmkitError(
            f"unknown settings in the config file: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = file_values | {k: v for k, v in flag_values.items() if v is not None}
    return [
        group(**{f.name: _coerce(f.name, str(f.type), values[f.name]) for f in fields(group) if f.name in values})
        for group in groups
    ]


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """YAML reads ``2e-2`` as a string and ``1`` as an int: give numeric fields their type."""
    if value is None or isinstance(value, bool):
        return value
    try:
        if annotation.startswith("float") and isinstance(value, int | float | str):
            return float(value)
        if annotation.startswith("int") and isinstance(value, int | str):
            return int(value)
    except ValueError:
        raise GlmkitError(f"{name} must be a number, not {value!r}") from None
    return value
