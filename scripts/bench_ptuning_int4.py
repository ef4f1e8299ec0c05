"""P-Tuning v2 training memory over a ChatGLM-6B base quantized to INT4, against the official claim.

THUDM/ChatGLM-6B's ``ptuning/README.md`` says ``quantization_bit 4`` trains ChatGLM-6B in 6.7 GB (batch 1,
``max_source_length`` 64, ``max_target_length`` 64, ``pre_seq_len`` 128, no prefix projection).  This
script trains those settings with glmkit, twice: over the INT4 base (glmkit's default group size) and,
for comparison, over the unquantized base in the training precision (bf16 on GPUs that have it).

The weights are random (glmkit.bench.shapes' ChatGLM-6B shape, family ``chatglm``: no download); the rest
is what ``glmkit train --method ptuning [--quantize 4]`` runs: the float model built on the CPU and
quantized block by block onto the GPU (as ``load_model(..., quantize=4)`` loads a float checkpoint), the
INT4 weights unpacked to the plain layout for training (``unpack_model``), ``prepare`` for ptuning (base
frozen, a float32 prefix encoder), AdamW over the prefix encoder, accelerate's mixed precision and the
trainer's own optimizer step (``_Loop``: the token loss, gradient clipping).  The layers run eagerly, as
the official scripts and ``glmkit train`` over a quantized base run them; ``--compile`` compiles them as
``glmkit train --compile`` does (about 80 s more for the INT4 base, and a peak of 15.75 GiB instead of
6.57 on an H200: the compiled layers keep the dequantized weights for the backward).  The rows are
random ids in the ChatGLM-6B layout of ``glmkit.train.layouts``: ``source - 1`` ids, [gMASK], <sop>,
``target - 2`` ids, <eop>, labels -100 before <sop>.

Reported per base: the memory the model holds once built (weights alone, and before training with the
prefix encoder), the peak ``max_memory_allocated`` / ``max_memory_reserved`` over the training steps
(counters reset after building, so the resident weights count, building's transient copies do not), what
the device shows in use after training (``mem_get_info``: CUDA context included, as nvidia-smi, where the
official figure comes from), the median step time and every step's loss.

    PYTHONPATH=$PWD/src python3 scripts/bench_ptuning_int4.py            # one CUDA GPU, the real shape
    PYTHONPATH=$PWD/src python3 scripts/bench_ptuning_int4.py --compile  # compiled layers (glmkit train --compile)
    PYTHONPATH=$PWD/src python3 scripts/bench_ptuning_int4.py --tiny --device cpu   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from glmkit.bench.shapes import SHAPES, Shape, model_class, prompt, random_model
from glmkit.models.quantize import DEFAULT_GROUP_SIZE, Int4Linear, is_quantized, quantize_model, unpack_model
from glmkit.train.args import PRECISIONS, MethodArgs, TrainingArgs
from glmkit.train.batching import BatchPlan
from glmkit.train.layouts import IGNORE
from glmkit.train.loss import labelled_tokens
from glmkit.train.methods import compiled_layers, count_parameters, prepare
from glmkit.train.trainer import _HALF, _accelerator, _compiles, _Loop, resolve_precision

FAMILY = "chatglm"
EOP = 130005  # ChatGLM-6B's eos; [gMASK] 130001 and <sop> 130004 come from shapes.prompt
OFFICIAL = {"source": "THUDM/ChatGLM-6B ptuning/README.md", "quantization_bit": 4, "memory_gb": 6.7}
GiB = 2**30
BASES = {"int4": 4, "float": None}  # the quantization of each base: INT4, none


def chatglm_row(shape: Shape, source: int, target: int, seed: int) -> dict[str, list[int]]:
    """A tokenized row as ``glmkit.train.layouts`` lays out a ChatGLM-6B example (the official ptuning
    main.py): ``source - 1`` prompt ids, [gMASK], <sop>, ``target - 2`` answer ids, <eop>; labels from <sop>."""
    vocab = shape.config["vocab_size"]
    prompt_ids = prompt(shape, source + 1, vocab, seed)  # random ids ending in [gMASK] <sop>
    generator = torch.Generator().manual_seed(seed + 1)
    answer = torch.randint(100, min(vocab, 130000) - 100, (target - 2,), generator=generator).tolist()
    ids = [*prompt_ids, *answer, EOP]
    context = len(prompt_ids) - 1
    return {"input_ids": ids, "labels": [IGNORE] * context + ids[context:]}


def base_model(shape: Shape, dtype: torch.dtype, device: torch.device, bits: int | None) -> torch.nn.Module:
    """The frozen base as ``glmkit train`` loads it: on the device in ``dtype``, or (``bits``) built on the
    CPU and quantized block by block onto the device, the float model never whole there."""
    cls, config_class = model_class(shape.family)
    config = config_class.from_dict(shape.config)
    if bits is None:
        return random_model(cls, config, [device], dtype)
    model = random_model(cls, config, [torch.device("cpu")], dtype, draw_device=device)
    return quantize_model(model, bits, DEFAULT_GROUP_SIZE, [device])


def tensor_gib(module: torch.nn.Module) -> float:
    """What the module's parameters and buffers occupy, wherever they are."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / GiB


def measure(shape: Shape, bits: int | None, args: argparse.Namespace) -> dict[str, Any]:
    try:
        return _measure(shape, bits, args)
    except Exception as exc:  # a base that cannot run reports why, the other still runs
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        torch._dynamo.reset()  # compiled layers keep their module alive otherwise: memory for the next base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure(shape: Shape, bits: int | None, args: argparse.Namespace) -> dict[str, Any]:
    training = TrainingArgs(device="cpu" if args.device == "cpu" else "auto", precision=args.precision,
                            batch_size=args.batch, compile=args.compile)  # fmt: skip
    torch.manual_seed(training.seed)
    precision = resolve_precision(training.precision, training.device)
    accelerator = _accelerator(training, "ptuning", precision, FAMILY)
    device = accelerator.device
    _reset_peak(device)
    try:
        network = base_model(shape, _HALF[precision], device, bits)
        if is_quantized(network):
            unpack_model(network)  # the trainer trains over the plain INT4 layout
        built = {"weights_gib": _allocated(device), "build_peak_gib": _peak(device)[0],
                 "weight_tensors_gib": tensor_gib(network)}  # fmt: skip
        int4 = [m for m in network.modules() if isinstance(m, Int4Linear)]
        prepared = prepare(network, Path("."), FAMILY, MethodArgs(method="ptuning", pre_seq_len=args.pre_seq_len))
        network.train()
        rows = [chatglm_row(shape, args.source, args.target, seed) for seed in range(args.batch * args.total)]
        plan = BatchPlan(len(rows), args.batch, 1, 1, training.seed)
        optimizer = torch.optim.AdamW(prepared.trainable(), lr=training.learning_rate_for("ptuning"),
                                      weight_decay=training.weight_decay)  # fmt: skip
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # the schedule costs no memory
        model, optimizer = accelerator.prepare(network, optimizer)
        label_counts = [labelled_tokens(torch.tensor([r["labels"]])) for r in rows]
        pad_id = network.config.pad_token_id
        loop = _Loop(accelerator, model, optimizer, scheduler, prepared, plan, rows, label_counts, pad_id, training)
        compiled = _compiles(training, accelerator, is_quantized(network))
        graphs = counters["stats"]["unique_graphs"]
        ready = _allocated(device)  # weights and prefix encoder; gradients and AdamW state come at step 1
        _reset_peak(device)
        losses, times = [], []
        with compiled_layers(network, compiled):
            for step in range(args.total):
                _sync(device)
                start = time.perf_counter()
                losses.append(loop.step(step)[0])
                _sync(device)
                times.append(time.perf_counter() - start)
        peak_allocated, peak_reserved = _peak(device)
        trainable, total = count_parameters(network)
        return {
            "base": f"INT{bits} g{DEFAULT_GROUP_SIZE}" if bits else precision, "precision": precision,
            "compiled_layers": compiled, "compiled_graphs": counters["stats"]["unique_graphs"] - graphs,
            "quantized_linears": len(int4),
            "int4_layouts": sorted({m.layout for m in int4}), **built, "before_training_gib": ready,
            "peak_allocated_gib": peak_allocated, "peak_reserved_gib": peak_reserved,
            "device_used_gib": _device_used(device), "step_seconds": statistics.median(times[args.warmup :]),
            "first_step_seconds": times[0], "losses": losses, "losses_finite": all(map(math.isfinite, losses)),
            "trainable_parameters": trainable, "parameters": total,
        }  # fmt: skip
    finally:
        accelerator.free_memory()  # it keeps the prepared model and optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None


def _peak(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


def _device_used(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GiB


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "bench_ptuning_int4.json" if out else Path("bench_ptuning_int4.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny ChatGLM-6B-family model (a smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (the first GPU) or cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--source", type=int, default=64, help="source tokens, [gMASK] included (max_source_length)")
    parser.add_argument("--target", type=int, default=64, help="target tokens, <sop> and <eop> included")
    parser.add_argument("--pre-seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="as glmkit train --precision")
    parser.add_argument("--compile", action="store_true", help="compiled decoder layers (glmkit train --compile)")
    parser.add_argument("--bases", default="int4,float", help="comma-separated subset of int4, float")
    parser.add_argument("--out", type=Path, default=default_out(), help="JSON results; default $OUT/ or ./")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: pass --device cpu (with --tiny)")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1, --warmup at least 0")
    args.total = args.warmup + args.steps
    if not set(args.bases.split(",")) <= set(BASES):
        parser.error(f"--bases: a comma-separated subset of {', '.join(BASES)}, not {args.bases!r}")
    shape = SHAPES["chatglm-6b"].tiny() if args.tiny else SHAPES["chatglm-6b"]
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "shape": shape.name, "config": shape.config, "batch": args.batch, "source": args.source,
        "target": args.target, "pre_seq_len": args.pre_seq_len, "prefix_projection": False,
        "warmup": args.warmup, "steps": args.steps, "compile": args.compile, "official": OFFICIAL,
        "rows": {name: measure(shape, BASES[name], args) for name in args.bases.split(",")},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"results written to {args.out}")
    failed = [name for name, row in results["rows"].items() if "error" in row or not row["losses_finite"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: dict[str, Any]) -> None:
    s = results
    layers = "compiled" if s["compile"] else "eager"
    print(f"\nP-Tuning v2, {s['shape']} on {s['device']}: batch {s['batch']}, {s['source']}+{s['target']} tokens, "
          f"pre_seq_len {s['pre_seq_len']}, {layers} layers (memory in GiB)\n")  # fmt: skip
    print("| base | weights | before training | peak allocated | peak reserved | device used | step s | losses |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r in results["rows"].items():
        if "error" in r:
            print(f"| {name} | - | - | - | - | - | - | {r['error']} |")
            continue
        losses = ", ".join(f"{loss:.3f}" for loss in r["losses"])
        base = r["base"] + (f" ({r['quantized_linears']} linears)" if r["quantized_linears"] else "")
        print(f"| {base} | {_gib(r['weights_gib'])} | {_gib(r['before_training_gib'])} "
              f"| {_gib(r['peak_allocated_gib'])} | {_gib(r['peak_reserved_gib'])} | {_gib(r['device_used_gib'])} "
              f"| {r['step_seconds']:.3f} | {losses} |")  # fmt: skip
    official = results["official"]
    print(f"| official INT4 claim | - | - | - | - | {official['memory_gb']} GB | - | {official['source']} |")


if __name__ == "__main__":
    main()
