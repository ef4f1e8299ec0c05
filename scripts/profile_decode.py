"""Where the decode step's time goes on one GPU: the diagnostics behind ``glmkit bench``'s batch-1 rows.

For a random-weight shape of ``glmkit bench`` (bf16): the decode step alone (graph replays, no sampling,
no host sync) per mode and batch, every linear of a step alone in one CUDA graph (the matmul floor), the
relative difference of one step's logits between the modes, and a kernel profile of 5 compiled steps at
batch 1 and 64 (``profile_step_b1.txt``, ``profile_step_b64.txt``).  Prints JSON and writes it to
``$OUT/profile_decode.json`` (or ``--out``).  The figures users compare come from ``glmkit bench``.

    PYTHONPATH=src python scripts/profile_decode.py [--shape glm4-9b] [--modes graphs,compiled]

``--kernels N`` instead compares weight formats (``KERNELS``): each linear of one decoder layer alone in a
CUDA graph at 1 to 256 rows (microseconds, GB/s of weight bytes, error against the dequantized weight),
then the compiled step of the shape cut to ``N`` layers (compiling is then quick) at 1, 8 and 64 rows:
bf16, INT8 through glmkit's Triton kernels, INT8 the way it ran before them (weight cast for a matmul,
coordinate-descent tuning on), INT4 through tinygemm.
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
from glmkit.engine.step import DecodeStep
from glmkit.models.quantize import quantize_model

ROWS = (1, 8, 64)


def _graph_us(fn) -> float:
    """Microseconds of one replay of ``fn`` captured as a CUDA graph (after two warm-up calls)."""
    fn()
    fn()
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync()
    start = time.perf_counter()
    for _ in range(20):
        graph.replay()
    sync()
    return (time.perf_counter() - start) / 20 * 1e6


def linears_floor(model, rows: int) -> float:
    """Milliseconds of one step's linears alone (every weight read once, batch ``rows``) in one CUDA graph."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=m.weight.device, dtype=m.weight.dtype) for m in linears]

    def once():
        for m, x in zip(linears, inputs, strict=True):
            m(x)

    with torch.inference_mode():
        return _graph_us(once) / 1e3


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


def _old_int8(module, x):
    """Int8Linear's CUDA matmul before the Triton kernels: cast the weight, matmul, scale."""
    return torch.nn.functional.linear(x, module.weight.to(x.dtype)) * module.weight_scale.to(x.dtype)


def _packed_int4(linear):
    from glmkit.models.quantize import Int4Linear

    module = Int4Linear.from_linear(linear, 32)
    module.pack()
    return module


KERNELS = {  # weight format -> (bits, group, matmul replacing the module's own, coordinate-descent tuning)
    "bf16": (None, None, None, False),
    "INT8 Triton": (8, None, None, False),
    "INT8 cast + matmul (tuned)": (8, None, _old_int8, True),
    "INT4 g32 (tinygemm)": (4, 32, None, False),
}


def kernel_variants(shape: Shape, layers: int, rows: tuple[int, ...]) -> list[dict]:
    """The compiled step of ``shape`` cut to ``layers`` layers per weight format (``KERNELS``), for a
    batch of each of ``rows``."""
    import torch._inductor.config as inductor

    from glmkit.models.quantize import Int4Linear, Int8Linear

    small = Shape(f"{shape.name}-{layers}-layers", shape.family, {**shape.config, "num_layers": layers})
    base = build(small, torch.device("cuda"), torch.bfloat16)
    ids = prompt(small, 128, vocab_size(base), 1)
    results = []
    for name, (bits, group, matmul, tuning) in KERNELS.items():
        model = base if bits is None else quantize_model(copy.deepcopy(base), bits, group_size=group or 32)
        saved = {cls: cls.matmul for cls in (Int8Linear, Int4Linear)}
        if matmul is not None:
            (Int8Linear if bits == 8 else Int4Linear).matmul = matmul
        inductor.coordinate_descent_tuning = tuning
        torch._dynamo.reset()
        for batch in rows:
            row = {"weights": name, "rows": batch, "weight_gb": round(weight_bytes(model) / 1e9, 3)}
            try:
                start = time.perf_counter()
                if batch == 1:
                    row["logits_rel_diff"] = step_agreement(model, ids, ["eager", "compiled"])["compiled"]
                row["step_ms"] = round(step_only(model, batch, "compiled", None), 3)
                row["first_s"] = round(time.perf_counter() - start, 1)
                row["gb_s"] = round(weight_bytes(model) / row["step_ms"] / 1e6, 1)
            except Exception as exc:  # one variant failing must not cost the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.append(row)
            print(json.dumps(row), flush=True)
        for cls, original in saved.items():
            cls.matmul = original
        if model is not base:
            del model
    inductor.coordinate_descent_tuning = False
    return results


def linear_rates(shape: Shape, rows: tuple[int, ...], copies: int = 8) -> list[dict]:
    """Each linear shape of one decoder layer alone: ``copies`` distinct weights (more bytes than the L2
    holds) multiplied in one CUDA graph, per weight format and batch; GB/s of weight bytes read."""
    from glmkit.models.quantize import Int8Linear

    one = build(Shape("one-layer", shape.family, {**shape.config, "num_layers": 1}), torch.device("cuda"),
                torch.bfloat16)  # fmt: skip
    shapes = [(m.in_features, m.out_features) for m in one.blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    del one
    formats = {  # name -> (module from a bf16 linear, matmul)
        "bf16": (lambda lin: lin, lambda module, x: module(x)),
        "INT8 Triton": (Int8Linear.from_linear, lambda module, x: module(x)),
        "INT8 cast + matmul": (Int8Linear.from_linear, _old_int8),
        "INT4 g32 (tinygemm)": (_packed_int4, lambda module, x: module(x)),
    }
    out = []
    with torch.inference_mode():
        for k, n in shapes:
            for name, (make, call) in formats.items():
                bf16 = [torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                modules = [make(linear) for linear in bf16]
                for m in rows:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    row = {"linear": f"{k}x{n}", "weights": name, "rows": m}
                    try:
                        us = _graph_us(lambda: [call(module, x) for module in modules]) / copies  # noqa: B023
                        row.update(us=round(us, 1), gb_s=round(weight_bytes(modules[0]) / us / 1e3, 1))
                        if name != "bf16":
                            reference = x.float() @ modules[0].dequantize(torch.float32).t()
                            got = call(modules[0], x).float()
                            row["rel_err"] = float((got - reference).norm() / reference.norm())
                    except Exception as exc:  # one format failing must not cost the others
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    out.append(row)
                    print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[name for name, shape in SHAPES.items() if shape.gpu_gb],
                        default="chatglm3-6b")  # fmt: skip
    parser.add_argument("--modes", default="graphs,compiled", help="modes of the step-alone timings")
    parser.add_argument("--skip-floor", action="store_true", help="skip the linears-only floor")
    parser.add_argument("--kernels", type=int, metavar="LAYERS", help="compare weight formats instead")
    parser.add_argument("--linears-only", action="store_true", help="with --kernels: the linears alone, no steps")
    parser.add_argument("--out", type=Path, help="default: $OUT/profile_decode.json")
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT", ".")) / "profile_decode.json"
    shape = SHAPES[args.shape]
    if args.kernels:
        steps = [] if args.linears_only else kernel_variants(shape, args.kernels, (1, 8, 64))
        report = {"shape": shape.name, "layers": args.kernels, "gpu": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "linears": linear_rates(shape, (1, 2, 16, 64, 256)),
                  "variants": steps}  # fmt: skip
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
