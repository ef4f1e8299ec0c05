"""The four ways to fine-tune: which weights learn, and what a finished run writes.

* lora: peft's LoRA layers injected into the native modules (names stay the checkpoint's), saved as a
  standard peft adapter folder;
* ptuning: P-Tuning v2 on the models' own prefix encoder, the base frozen, saved as the official
  checkpoint (config.json with ``pre_seq_len``/``prefix_projection``, only ``transformer.prefix_encoder.*``);
* freeze: the last N layers (their mlp, attention or both) learn; full: every weight.  Both save a whole
  model directory in the original checkpoint format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmkit.errors import GlmkitError
from glmkit.models import read_config
from glmkit.models.adapters import inject_lora, peft_target
from glmkit.models.base import Block
from glmkit.models.loading import PREFIX_ENCODER, attach_prefix_encoder
from glmkit.train.args import MethodArgs
from glmkit.train.export import checkpoint_dtype, save_model_dir

# the names layers give these parts: GLM (attention / self_attention), Llama and most transformers models
ATTENTION_MODULES = {"attention", "self_attention", "self_attn", "attn"}
MLP_MODULES = {"mlp", "feed_forward"}


@dataclass
class Prepared:
    """A network set up for one method: ``save(dir, final)`` writes what the method produces (a checkpoint
    when not ``final``; ``load(dir)`` reads that back for a resumed run)."""

    network: nn.Module
    save: Callable[[Path, bool], None]
    load: Callable[[Path], None]

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]


def prepare(network: nn.Module, model_dir: Path, family: str, args: MethodArgs) -> Prepared:
    """Make the weights of ``args.method`` trainable (the rest frozen); new weights come from torch's RNG."""
    return {"lora": _lora, "ptuning": _ptuning, "freeze": _freeze, "full": _full}[args.method](
        network, model_dir, family, args
    )


def _lora(network: nn.Module, model_dir: Path, family: str, args: MethodArgs) -> Prepared:
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets(family),
    )
    try:
        model = inject_lora(network, config)  # freezes the base, injects in place
    except ValueError as exc:
        raise GlmkitError(f"--lora-target {','.join(config.target_modules)}: {exc}") from exc
    model.peft_config["default"].base_model_name_or_path = str(model_dir)  # export finds the base by it

    def load(directory: Path) -> None:
        set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"))

    def save(directory: Path, final: bool) -> None:
        model.save_pretrained(str(directory), save_embedding_layers=False)

    return Prepared(network, save=save, load=load)


def _ptuning(network: nn.Module, model_dir: Path, family: str, args: MethodArgs) -> Prepared:
    if family not in ("chatglm", "chatglm2"):
        raise GlmkitError("--method ptuning (P-Tuning v2) needs a ChatGLM-family model; use lora for others")
    network.requires_grad_(False)
    attach_prefix_encoder(network, args.pre_seq_len, args.prefix_projection, args.prefix_hidden_size)
    encoder = network.transformer.prefix_encoder  # float32 whatever the model's dtype, as the official recipe

    def save(directory: Path, final: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        state = {PREFIX_ENCODER + k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"))
        config = read_config(model_dir)  # the official trainer saves the whole config with the prefix settings
        config.update(pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection)
        if args.prefix_projection and args.prefix_hidden_size:
            config["prefix_hidden_size"] = args.prefix_hidden_size
        (directory / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def load(directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / "model.safetensors"))
        encoder.load_state_dict({k.removeprefix(PREFIX_ENCODER): v for k, v in state.items()})

    return Prepared(network, save=save, load=load)


def _whole_model(network: nn.Module, model_dir: Path) -> Prepared:
    """freeze and full write the whole model; a checkpoint keeps the training dtype (float32 master
    weights) so a resumed run continues exactly, the final directory the base checkpoint's dtype."""

    def load(directory: Path) -> None:
        from glmkit.models.weights import load_state_dict

        state = load_state_dict(directory)
        target = peft_target(network)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise GlmkitError(
                f"{directory} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )

    def save(directory: Path, final: bool) -> None:
        save_model_dir(network, model_dir, directory, dtype=checkpoint_dtype(model_dir) if final else None)

    return Prepared(network, save=save, load=load)


def _freeze(network: nn.Module, model_dir: Path, family: str, args: MethodArgs) -> Prepared:
    network.requires_grad_(False)
    layers = decoder_layers(network)
    if args.trainable_layers > len(layers):
        raise GlmkitError(f"--trainable-layers {args.trainable_layers}: the model has {len(layers)} layers")
    for layer in layers[-args.trainable_layers :]:
        if args.trainable_modules == "all":  # norms included
            layer.requires_grad_(True)
            continue
        wanted = ATTENTION_MODULES if args.trainable_modules == "attention" else MLP_MODULES
        for name, child in layer.named_children():
            if name in wanted:
                child.requires_grad_(True)
    if not any(p.requires_grad for p in network.parameters()):
        raise GlmkitError(f"--trainable-modules {args.trainable_modules}: no such module in the layers")
    return _whole_model(network, model_dir)


def _full(network: nn.Module, model_dir: Path, family: str, args: MethodArgs) -> Prepared:
    network.requires_grad_(True)
    return _whole_model(network, model_dir)


def decoder_layers(network: nn.Module) -> nn.ModuleList:
    """The decoder layers: glmkit's ``blocks``, else the longest ModuleList of a transformers model."""
    blocks = getattr(network, "blocks", None)
    if blocks is not None:
        return blocks
    lists = [m for m in peft_target(network).modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise GlmkitError("cannot find the decoder layers of this model")
    return max(lists, key=len)


def enable_gradient_checkpointing(network: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (glmkit's blocks, or transformers' own)."""
    blocks = getattr(network, "blocks", None)
    # glmkit's own layers; transformers' layers (HFCausalLM.blocks) are switched by transformers itself
    if blocks is not None and all(isinstance(block, Block) for block in blocks):
        for block in blocks:
            block.gradient_checkpointing = True
        return
    inner = peft_target(network)
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise GlmkitError("this model does not support gradient checkpointing")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def compiled_layers(network: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Each decoder layer's forward compiled with torch.compile inside the block, the plain forward back
    after it (so generation afterwards runs the engine's own compiled step).  Layers, not the whole model:
    they share one graph, so the compile cost is one layer's, and the loss, peft's wrapper and the
    prefix encoder stay outside it."""
    layers = list(decoder_layers(network)) if enabled else []
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute goes; the class's forward shows through again


def count_parameters(network: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(network.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
