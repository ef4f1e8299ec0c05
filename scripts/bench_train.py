"""Training speed and memory: glmkit's native ChatGLM3-6B module vs transformers' GlmForCausalLM + peft.

Both models get the ChatGLM3-6B shape (28 layers, hidden 4096, ffn 13696, 32 heads, multi-query with 2
key/value groups, vocab 65024) with random bf16 weights, and train the same steps: batch 4 x 512 tokens,
AdamW, for

* LoRA r8 on the attention input projection (glmkit: query_key_value; transformers: q/k/v_proj),
* the same with gradient checkpointing,
* P-Tuning v2 with 128 prefix positions (transformers side: peft prefix tuning).

Reported: tokens/s (median of the timed steps after warm-up) and peak memory
(``torch.cuda.max_memory_allocated``), as a table and as JSON.  The ``glmkit`` side is what
``glmkit train`` runs on a GPU: the trainer's setup, loss and compiled layers (``compiled_layers``);
``--eager`` adds glmkit without compiled layers (``glmkit train --no-compile``).

    python scripts/bench_train.py                       # one CUDA GPU, the real shape
    python scripts/bench_train.py --eager --profile     # also eager glmkit; the top GPU kernels of a step
    python scripts/bench_train.py --tiny --device cpu   # a tiny shape: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

CHATGLM3_6B = {
    "padded_vocab_size": 65024, "hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32,
    "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
    "seq_length": 8192, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True,
}  # fmt: skip
TINY = CHATGLM3_6B | {"padded_vocab_size": 1024, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
                      "kv_channels": 16, "ffn_hidden_size": 128, "seq_length": 256}  # fmt: skip
CASES = ("lora", "lora+checkpointing", "ptuning")
SIDES = ("glmkit", "glmkit eager", "transformers+peft")


def glmkit_model(
    cfg: dict, case: str, device: torch.device, stack: contextlib.ExitStack, compile_layers: bool = True
) -> tuple[torch.nn.Module, Any]:
    from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmkit.train.args import MethodArgs
    from glmkit.train.loss import token_loss_sum
    from glmkit.train.methods import compiled_layers, enable_gradient_checkpointing, prepare

    with torch.device(device):
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_dict(cfg)).to(torch.bfloat16)
    _randomize(model)
    method = MethodArgs(method="ptuning" if case == "ptuning" else "lora", lora_rank=8, lora_dropout=0.0,
                        lora_target="query_key_value", pre_seq_len=128)  # fmt: skip
    prepare(model, Path("."), "chatglm2", method)
    if case == "lora+checkpointing":
        enable_gradient_checkpointing(model)
    stack.enter_context(compiled_layers(model, compile_layers))  # as glmkit train does on a GPU

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids).logits
        return token_loss_sum(logits, ids) / (ids.shape[0] * (ids.shape[1] - 1))

    return model.train(), loss_fn


def transformers_model(
    cfg: dict, case: str, device: torch.device, stack: contextlib.ExitStack
) -> tuple[torch.nn.Module, Any]:
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        vocab_size=cfg["padded_vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["multi_query_group_num"], head_dim=cfg["kv_channels"], partial_rotary_factor=0.5,
        attention_bias=True, max_position_embeddings=cfg["seq_length"], tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = GlmForCausalLM(config).to(torch.bfloat16)
    _randomize(model)
    if case == "ptuning":
        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=128))
    else:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"]))
    if case == "lora+checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss  # transformers' own loss, as a Trainer run computes it

    return model.train(), loss_fn


def _randomize(model: torch.nn.Module) -> None:
    """Random matrices (norm weights stay 1): a module built on the device starts uninitialised or not."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)


def measure(build, cfg: dict, case: str, args, device: torch.device) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        result = _measure(build, cfg, case, args, device, stack)
    torch._dynamo.reset()  # compiled layers keep their module alive otherwise: memory for the next side
    gc.collect()
    return result


def _measure(build, cfg: dict, case: str, args, device: torch.device, stack: contextlib.ExitStack) -> dict[str, Any]:
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, loss_fn = build(cfg, case, device, stack)
    except Exception as exc:  # a side that cannot run this case reports why, the rest goes on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if device.type == "cuda":
        # the peak of training (weights included), not of building: modules are built in float32 first
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg["padded_vocab_size"], (args.batch, args.seq), device=device)
    times = []

    def train_step() -> torch.Tensor:
        loss = loss_fn(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        for step in range(args.warmup + args.steps):
            _sync(device)
            start = time.perf_counter()
            loss = train_step()
            _sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        kernels = top_kernels(train_step, device) if args.profile else None
    except torch.OutOfMemoryError:
        return {"error": "CUDA out of memory"}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_second": args.batch * args.seq / median, "step_seconds": median, "peak_memory_gib": peak,
            "loss": loss.item(), **({"top_kernels": kernels} if kernels else {})}  # fmt: skip


def top_kernels(train_step, device: torch.device, count: int = 12) -> list[dict[str, Any]] | None:
    """The GPU kernels that take most of one training step, with their share of its device time."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step()
        torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "ms": round(e.self_device_time_total / 1000, 2), "calls": e.count,
             "share": round(e.self_device_time_total / total, 3)} for e in events[:count]]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same layout (a smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--output", type=Path, default=Path("bench_train.json"))
    parser.add_argument("--eager", action="store_true", help="also glmkit without compiled layers")
    parser.add_argument("--profile", action="store_true", help="record the top GPU kernels of one step per side")
    args = parser.parse_args()
    if args.tiny:
        args.seq = min(args.seq, 64)
    device = torch.device(args.device)
    cfg = TINY if args.tiny else CHATGLM3_6B
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "config": cfg, "batch": args.batch, "seq": args.seq,
                               "cases": {}}  # fmt: skip
    for case in args.cases.split(","):
        row = {
            "glmkit": measure(glmkit_model, cfg, case, args, device),
            "transformers+peft": measure(transformers_model, cfg, case, args, device),
        }
        if args.eager:
            row["glmkit eager"] = measure(partial(glmkit_model, compile_layers=False), cfg, case, args, device)
        theirs = row["transformers+peft"].get("tokens_per_second")
        for side in ("glmkit", "glmkit eager"):
            if theirs and "tokens_per_second" in row.get(side, {}):
                row[side]["speedup_vs_transformers"] = row[side]["tokens_per_second"] / theirs
        results["cases"][case] = row
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.output}")


def print_table(results: dict[str, Any]) -> None:
    print(f"{'case':<20} {'side':<18} {'tokens/s':>10} {'peak GiB':>9}  note")
    for case, sides in results["cases"].items():
        for side in SIDES:
            r = sides.get(side)
            if r is None:
                continue
            if "error" in r:
                print(f"{case:<20} {side:<18} {'-':>10} {'-':>9}  {r['error']}")
                continue
            peak = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            speedup = r.get("speedup_vs_transformers")
            note = f"{speedup:.2f}x transformers+peft" if speedup else ""
            print(f"{case:<20} {side:<18} {r['tokens_per_second']:>10.0f} {peak:>9}  {note}")
            for k in r.get("top_kernels", []):
                print(f"{'':<20}   {k['share']:>6.1%} {k['ms']:>8.2f} ms x{k['calls']:<5} {k['kernel']}")


if __name__ == "__main__":
    main()
