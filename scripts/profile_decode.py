"""Where the decode step's time goes on one GPU: the diagnostics behind ``glmkit bench``'s batch-1 rows.

For a random-weight shape of ``glmkit bench`` (bf16): the decode step alone (graph replays, no sampling,
no host sync) per mode and batch, every linear of a step alone in one CUDA graph (the matmul floor), the
relative difference of one step's logits between the modes, and a kernel profile of 5 compiled steps at
batch 1 and 64 (``profile_step_b1.txt``, ``profile_step_b64.txt``).  Prints JSON and writes it to
``$OUT/profile_decode.json`` (or ``--out``).  The figures users compare come from ``glmkit bench``.

    PYTHONPATH=src python scripts/profile_decode.py [--shape glm4-9b] [--modes graphs,compiled]

``--kernels N`` instead compares the kernels of the compiled batch-1 step on the shape cut to ``N`` layers
(compiling is then quick): bf16, INT8, INT4 through ``_weight_int4pack_mm`` and INT4 dequantized in the
plain layout, each with inductor's coordinate-descent tuning off and on (which turns a one-row matmul
into a reduction that the weight's dequantization fuses into); the step's milliseconds, the weight
bytes it reads over that time, the compile seconds, and its logits against the eager step's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from glmkit.bench.measure import sync, weight_bytes
from glmkit.bench.shapes import SHAPES, Shape, build, prompt, vocab_size
from glmkit.engine import step as step_module
from glmkit.engine.step import DecodeStep
from glmkit.models.quantize import quantize_model

ROWS = (1, 8, 64)


def linears_floor(model, rows: int) -> float:
    """Milliseconds of one step's linears alone (every weight read once, batch ``rows``) in one CUDA graph."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=m.weight.device, dtype=m.weight.dtype) for m in linears]

    def once():
        for m, x in zip(linears, inputs, strict=True):
            m(x)

    with torch.inference_mode():
        once()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            once()
        graph.replay()
        sync()
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync()
    return (time.perf_counter() - start) / 20 * 1e3


def step_only(model, rows: int, mode: str, out: Path | None) -> float:
    """Milliseconds of one decode step alone for ``rows`` rows at position 200 of a 384-position cache;
    with ``out``, a kernel profile of 5 steps is written there."""
    cache = model.new_cache(rows, 384)
    step = DecodeStep(model, cache, mode=mode)
    with torch.inference_mode():
        for row in range(rows):
            step.place(row, (1000 + row) % vocab_size(model), 200)
        for _ in range(3):
            step.run(rows)
            step.positions.fill_(200)
        sync()
        start = time.perf_counter()
        for _ in range(50):
            step.run(rows)
            step.positions.fill_(200)
        sync()
        ms = (time.perf_counter() - start) / 50 * 1e3
        if out is not None:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step.run(rows)
                sync()
            out.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return ms


def step_agreement(model, ids: list[int], modes: list[str]) -> dict[str, float]:
    """Relative L2 difference of one step's logits between each mode and the first (same cache state)."""
    logits = {}
    with torch.inference_mode():
        for mode in modes:
            cache = model.new_cache(1, 384)
            model(torch.tensor([ids], device=model.device), cache=cache, last_only=True)
            step = DecodeStep(model, cache, mode=mode)
            step.place(0, 1000 % vocab_size(model), len(ids))
            logits[mode] = step.run(1).float().clone()
    first = logits[modes[0]]
    return {m: float((x - first).norm() / first.norm()) for m, x in logits.items()}


def kernel_variants(shape: Shape, layers: int) -> list[dict]:
    """The compiled batch-1 step of ``shape`` cut to ``layers`` layers, per weight format and tuning."""
    import torch._inductor.config as inductor

    small = Shape(f"{shape.name}-{layers}-layers", shape.family, {**shape.config, "num_layers": layers})
    base = build(small, torch.device("cuda"), torch.bfloat16)
    ids = prompt(small, 128, vocab_size(base), 1)
    variants = {"bf16": lambda: base, "INT8": lambda: quantize_model(copy.deepcopy(base), 8),
                "INT4 tinygemm": lambda: quantize_model(copy.deepcopy(base), 4),
                "INT4 plain": lambda: quantize_model(copy.deepcopy(base), 4, pack=False)}  # fmt: skip
    rows = []
    for name, make in variants.items():
        model = make()
        for tuning in (False, True):
            inductor.coordinate_descent_tuning = tuning
            torch._dynamo.reset()
            # the step's own choice (tuning for INT8) set aside: the global setting decides here
            compiled = torch.compile(step_module._decode)
            step_module._compiled.update({False: compiled, True: compiled})
            row = {"weights": name, "coordinate_descent": tuning, "weight_gb": round(weight_bytes(model) / 1e9, 3)}
            try:
                start = time.perf_counter()
                row["logits_rel_diff"] = step_agreement(model, ids, ["eager", "compiled"])["compiled"]
                row["compile_s"] = round(time.perf_counter() - start, 1)
                row["step_ms"] = round(step_only(model, 1, "compiled", None), 3)
                row["gb_s"] = round(weight_bytes(model) / row["step_ms"] / 1e6, 1)
            except Exception as exc:  # one variant failing must not cost the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    inductor.coordinate_descent_tuning = False
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[name for name, shape in SHAPES.items() if shape.gpu_gb],
                        default="chatglm3-6b")  # fmt: skip
    parser.add_argument("--modes", default="graphs,compiled", help="modes of the step-alone timings")
    parser.add_argument("--skip-floor", action="store_true", help="skip the linears-only floor")
    parser.add_argument("--kernels", type=int, metavar="LAYERS", help="compare weight formats and tuning instead")
    parser.add_argument("--out", type=Path, help="default: $OUT/profile_decode.json")
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT", ".")) / "profile_decode.json"
    shape = SHAPES[args.shape]
    if args.kernels:
        report = {"shape": shape.name, "layers": args.kernels, "gpu": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "variants": kernel_variants(shape, args.kernels)}  # fmt: skip
        out.write_text(json.dumps(report, indent=1))
        return
    model = build(shape, torch.device("cuda"), torch.bfloat16)
    modes = args.modes.split(",")
    report: dict = {"shape": shape.name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["step_logits_rel_diff"] = step_agreement(model, prompt(shape, 128, vocab_size(model), 1), ["eager", *modes])
    report["step_only_ms"] = {f"{m} x{rows}": step_only(model, rows, m, None) for m in modes for rows in ROWS}
    if not args.skip_floor:
        report["linears_floor_ms"] = {rows: linears_floor(model, rows) for rows in ROWS}
    for rows in (1, 64):
        step_only(model, rows, "compiled", out.with_name(f"profile_step_b{rows}.txt"))
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
