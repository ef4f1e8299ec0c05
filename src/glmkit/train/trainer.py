"""The training loop, on accelerate (not transformers' ``Trainer``).

Why not ``Trainer``: it expects transformers models (glmkit's are plain modules with a cache-aware
forward), writes checkpoints in place (a kill mid-save leaves a broken ``checkpoint-N`` that resume then
picks), and averages the loss per process and micro-batch, so N processes or accumulation steps do not
give the loss of one big batch.  This loop is short and owns those three things: atomic checkpoints
(``checkpoints.py``), a data order that is a function of seed and step (``batching.py``), and a loss
normalised by the labelled tokens of the whole global batch.  accelerate still does what it is good at:
DDP / FSDP / DeepSpeed set-up, autocast and fp16 loss scaling.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmkit.errors import GlmkitError
from glmkit.train import checkpoints
from glmkit.train.args import MethodArgs, ModelArgs, TrainingArgs, check_together
from glmkit.train.batching import BatchPlan, pad_rows
from glmkit.train.loss import labelled_tokens, token_loss_sum
from glmkit.train.methods import (
    Prepared,
    compiled_layers,
    count_parameters,
    enable_gradient_checkpointing,
    prepare,
)
from glmkit.train.run_log import TrainerLog, plot_loss, write_run_file

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # every step's loss over the global batch
    prepared: Prepared | None = None


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on CUDA GPUs that have it, fp16 on older ones, fp32 elsewhere (CPU, MPS)."""
    if precision != "auto":
        return precision
    if device != "cpu" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _accelerator(training: TrainingArgs, method: str, precision: str, family: str):
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {
        "cpu": training.device == "cpu",
        "mixed_precision": "no" if precision == "fp32" else precision,
    }
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if training.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise GlmkitError("--deepspeed needs the deepspeed package: pip install deepspeed (or drop --deepspeed)")
        from accelerate import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=training.deepspeed)
    elif distributed and method == "full" and training.device != "cpu":
        from accelerate import FullyShardedDataParallelPlugin

        # every weight trains: shard weights, gradients and optimizer state over the GPUs, layer by layer
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=_block_class_names(family)
        )
    return Accelerator(**kwargs)


def _block_class_names(family: str) -> list[str]:
    return {"chatglm": ["GLMBlock"], "chatglm2": ["GLMBlock"], "llama": ["DecoderLayer"]}.get(family, [])


def _check_output_dir(output_dir: Path, training: TrainingArgs) -> None:
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    if training.resume:
        return
    if not training.overwrite_output_dir:
        raise GlmkitError(
            f"output directory {output_dir} is not empty: pass --resume to continue its run, "
            "--overwrite-output-dir to replace it, or choose another --output-dir"
        )
    shutil.rmtree(output_dir)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(
    model_args: ModelArgs,
    method_args: MethodArgs,
    training: TrainingArgs,
    rows: list[dict[str, list[int]]],
    pad_token_id: int,
    settings_for_log: list[Any] | None = None,
    evaluate_fn: Any = None,
) -> TrainResult:
    """Fine-tune ``model_args.model`` on tokenized ``rows`` (``input_ids`` and ``labels``, -100 = no loss)
    with ``method_args.method``; writes the result and the logs into ``training.output_dir``.

    ``evaluate_fn(network, step) -> dict`` (optional) runs on process 0 every ``eval_steps`` and at the end.
    """
    from glmkit.hub import resolve_model
    from glmkit.models import load_model, model_family, read_config
    from glmkit.models.quantize import is_quantized, unpack_model

    check_together(model_args, method_args, training)

    if not training.output_dir:
        raise GlmkitError("--output-dir is required: where checkpoints and the result go")
    if not rows:
        raise GlmkitError("no training rows: the data file holds no examples")
    output_dir = Path(training.output_dir)
    model_dir = resolve_model(model_args.model, source=model_args.source)
    family = model_family(read_config(model_dir))
    precision = resolve_precision(training.precision, training.device)
    accelerator = _accelerator(training, method_args.method, precision, family)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        _check_output_dir(output_dir, training)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.remove_partial(output_dir)
    accelerator.wait_for_everyone()
    found = checkpoints.list_checkpoints(output_dir) if training.resume else []
    resume_from = found[-1] if found else None  # --resume with no checkpoint yet starts from the beginning

    _seed(training.seed)
    load_dtype = _HALF[precision] if method_args.method in ("lora", "ptuning") else torch.float32  # master weights
    network = load_model(model_dir, dtype=load_dtype, device=accelerator.device, quantize=model_args.quantize)
    if is_quantized(network):  # --quantize, or a checkpoint that is quantized already
        if method_args.method not in ("lora", "ptuning"):
            raise GlmkitError(f"{model_dir} holds quantized weights: train it with --method lora or ptuning")
        unpack_model(network)
    prepared = prepare(network, model_dir, family, method_args)
    if training.checkpointing_for(method_args.method):
        enable_gradient_checkpointing(network)
    network.train()
    if resume_from is not None:
        prepared.load(resume_from[1])

    plan = BatchPlan(len(rows), training.batch_size, training.gradient_accumulation_steps, world, training.seed)
    max_steps = training.max_steps or math.ceil(training.epochs * plan.steps_per_epoch)
    optimizer = torch.optim.AdamW(
        prepared.trainable(), lr=training.learning_rate_for(method_args.method), weight_decay=training.weight_decay
    )
    from transformers import get_scheduler

    scheduler = get_scheduler(
        training.lr_scheduler, optimizer, num_warmup_steps=math.ceil(training.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )  # fmt: skip
    trainer_state = {"global_batch": plan.global_batch, "seed": plan.seed, "num_rows": plan.num_rows,
                     "method": method_args.method, "world_size": world, "quantize": model_args.quantize}  # fmt: skip
    start = 0
    if resume_from is not None:
        saved = checkpoints.read_training_state(resume_from[1], optimizer, scheduler, rank)
        changed = [k for k, v in trainer_state.items() if saved.get(k) != v]
        if changed:
            raise GlmkitError(
                f"{resume_from[1]} was trained with other {', '.join(changed)} ("
                + ", ".join(f"{k}={saved.get(k)}" for k in changed)
                + "): resume with the settings of that run"
            )
        start = saved["step"]
    model, optimizer = accelerator.prepare(network, optimizer)

    trainable, total = count_parameters(network)
    log = TrainerLog(output_dir, resume_step=start) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        write_run_file(output_dir, settings_for_log or [model_args, method_args, training],
                       {"resolved": {"precision": precision, "max_steps": max_steps, "world_size": world,
                                     "global_batch": plan.global_batch, "family": family, "model_dir": str(model_dir),
                                     "trainable_parameters": trainable, "parameters": total,
                                     "resumed_from_step": start}})  # fmt: skip

    label_counts = [labelled_tokens(torch.tensor([r["labels"]])) for r in rows]
    result = TrainResult(output_dir, max_steps, prepared=prepared)
    loop = _Loop(accelerator, model, optimizer, scheduler, prepared, plan, rows, label_counts, pad_token_id, training)
    from tqdm.auto import tqdm

    compile_layers = _compiles(training, accelerator, is_quantized(network))
    if compile_layers and accelerator.is_main_process:
        print("compiling the decoder layers: the first steps are slow (--no-compile turns this off)", flush=True)
    bar = tqdm(total=max_steps, initial=start, disable=not accelerator.is_main_process, desc="training", unit="step")
    window: list[float] = []
    tokens, started = 0, time.perf_counter()
    try:
        with compiled_layers(network, compile_layers):
            for step in range(start, max_steps):
                lr = scheduler.get_last_lr()[0]
                loss, step_tokens = loop.step(step)
                result.losses.append(loss)
                window.append(loss)
                tokens += step_tokens
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if log is not None and (done % training.logging_steps == 0 or done == max_steps):
                    elapsed = time.perf_counter() - started
                    log.write({"step": done, "epoch": round(done / plan.steps_per_epoch, 4),
                               "loss": sum(window) / len(window), "learning_rate": lr,
                               "tokens_per_second": round(tokens / elapsed, 1),
                               **_peak_memory(accelerator.device)})  # fmt: skip
                    window, tokens, started = [], 0, time.perf_counter()
                if _due(training.save_steps, done, max_steps):
                    checkpoints.write_checkpoint(
                        output_dir, done, lambda d: prepared.save(d, False), trainer_state, optimizer, scheduler, rank,
                        accelerator.wait_for_everyone,
                    )  # fmt: skip
                    if accelerator.is_main_process:
                        checkpoints.prune(output_dir, training.save_total_limit)
                if evaluate_fn is not None and _due(training.eval_steps, done, max_steps):
                    _evaluate(evaluate_fn, network, done, log, accelerator, compiled=compile_layers)
    except torch.OutOfMemoryError as exc:
        raise GlmkitError(
            f"CUDA out of memory ({str(exc).splitlines()[0]}). Lower --batch-size (raise "
            "--gradient-accumulation-steps to keep the global batch), shorten the data (max source/target "
            "length), add --gradient-checkpointing, or use --method lora / ptuning"
        ) from exc
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    network.eval()
    if accelerator.is_main_process:
        prepared.save(output_dir, True)
        plot_loss(log, output_dir)
    if evaluate_fn is not None:
        _evaluate(evaluate_fn, network, max_steps, log, accelerator)
    accelerator.wait_for_everyone()
    return result


def _peak_memory(device: torch.device) -> dict[str, float]:
    """The log's ``peak_memory_gib`` on a GPU: the most this process's tensors have held so far."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def _due(every: int, done: int, max_steps: int) -> bool:
    """Whether a periodic save or evaluation falls after step ``done`` (the end has its own)."""
    return bool(every) and done % every == 0 and done < max_steps


def _compiles(training: TrainingArgs, accelerator, quantized: bool = False) -> bool:
    """``--compile``, else on for CUDA, except for sharded runs (FSDP, DeepSpeed), where compiled layers
    have not been verified, and over a quantized base: a compiled layer keeps every dequantized weight
    from its forward for the backward, which the quantized linears' own backward exists to avoid
    (P-Tuning v2 on an INT4 ChatGLM-6B on an H200: 15.75 GiB at the peak compiled, 6.57 GiB eager;
    scripts/bench_ptuning_int4.py)."""
    from accelerate.utils import DistributedType

    if training.compile is not None:
        return training.compile
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return accelerator.device.type == "cuda" and not sharded and not quantized


def _evaluate(
    evaluate_fn: Any, network: torch.nn.Module, step: int, log: TrainerLog | None, accelerator, compiled: bool = False
) -> None:
    if accelerator.is_main_process:
        was_training = network.training
        network.eval()
        # compiled training layers would recompile for every decoding shape: evaluate them eagerly
        with torch.compiler.set_stance("force_eager") if compiled else nullcontext():
            metrics = evaluate_fn(network, step)
        network.train(was_training)
        log.write({"step": step, "eval": metrics})
    accelerator.wait_for_everyone()


class _Loop:
    """One optimizer step: this process's micro-batches, the gradient, the update."""

    def __init__(self, accelerator, model, optimizer, scheduler, prepared, plan, rows, label_counts, pad_id, training):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.prepared, self.plan, self.rows, self.label_counts, self.pad_id = prepared, plan, rows, label_counts, pad_id
        self.max_grad_norm = training.max_grad_norm

    def step(self, step: int) -> tuple[float, int]:
        """Train on global batch ``step``; returns its loss (mean over its labelled tokens) and how many
        tokens all processes read."""
        acc, plan = self.accelerator, self.plan
        global_rows = plan.step_rows(step)
        # normalise by the labelled tokens of the whole global batch: N processes and accumulation steps
        # then give the gradient of one large batch (DDP averages over processes, hence the * world)
        labelled = max(1, sum(self.label_counts[i] for i in global_rows))
        loss_sum = torch.zeros((), device=acc.device)
        micro = plan.micro_batches(step, acc.process_index)
        for m, indices in enumerate(micro):
            batch = pad_rows([self.rows[i] for i in indices], self.pad_id, acc.device)
            context = acc.no_sync(self.model) if m < len(micro) - 1 else nullcontext()
            with context:
                logits = self.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                summed = token_loss_sum(logits, batch["labels"])
                acc.backward(summed * (plan.world_size / labelled))
            loss_sum += summed.detach().float()
        loss = (acc.reduce(loss_sum, reduction="sum") / labelled).item()
        if not math.isfinite(loss):
            raise GlmkitError(
                f"the loss became {loss} at step {step + 1}: training diverged. Lower --learning-rate; with "
                "--precision fp16 use bf16 (or fp32) instead, fp16 overflows"
            )
        if self.max_grad_norm:
            acc.clip_grad_norm_(self.prepared.trainable(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, sum(len(self.rows[i]["input_ids"]) for i in global_rows)
