"""Weight-only quantization on a ChatGLM3-6B-shaped model: kernel checks, single-token latency, memory.

A bf16 model with random weights (28 layers, hidden 4096, ffn 13696, 32 heads, multi-query attention with
2 groups, vocab 65024) is built on the CPU in glmkit's native chatglm2 module; each variant is put on the
device from there (quantized block by block: the bf16 model is never whole on the GPU for INT8/INT4):

1. kernel check: every linear of layer 0 against a float32 matmul of its dequantized weight (relative
   error), the INT4 weight read back from the CUDA layout, and (CUDA) the aten INT8 kernel when present;
2. timing, batch 1, one new token after a 128-token prompt, median over ``--iters`` (CUDA events): the four
   linears of one layer, and the whole model forward (``cache`` cropped back every step);
3. a table: ms, tok/s, the bytes one token reads (decoder linears + output layer + KV cache), the
   bandwidth that implies and the tok/s bound at ``--bandwidth`` GB/s (H200: 4800), peak memory, and the
   prompt's last logits against the first variant's.

    PYTHONPATH=src python scripts/bench_quantize.py                 # H200: bf16, INT8, INT4 g32 and g128
    PYTHONPATH=src python scripts/bench_quantize.py --compile       # also torch.compile'd layer linears
    PYTHONPATH=src python scripts/bench_quantize.py --tiny          # CPU smoke run at a tiny shape
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from glmkit.bench.shapes import CHATGLM3_6B, random_model
from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmkit.models.quantize import Int4Linear, Int8Linear, QuantizedLinear, quantize_model

FULL = ChatGLM2Config.from_dict(CHATGLM3_6B)
TINY = ChatGLM2Config(
    hidden_size=256, num_layers=2, num_attention_heads=4, kv_channels=64, multi_query_group_num=2,
    ffn_hidden_size=704, padded_vocab_size=1024, seq_length=512,
)  # fmt: skip
GB, GiB = 1e9, 2**30
PROMPT = 128


def variant(cpu_model, name: str, device: torch.device):
    model = copy.deepcopy(cpu_model)
    if name == "bf16":
        return model.to(device)
    bits, group_size = (8, 32) if name == "int8" else (4, int(name.split("g")[1]))
    return quantize_model(model, bits, group_size, [device])


def layer_linears(block) -> list:
    attn, mlp = block.self_attention, block.mlp
    return [attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]


def linear_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def bytes_per_token(model, cache_length: int) -> int:
    cfg = model.config
    decoder = sum(linear_bytes(m) for block in model.blocks for m in layer_linears(block))
    head = model.transformer.output_layer.weight.numel() * 2
    kv = cfg.num_layers * 2 * cfg.kv_heads * cfg.kv_channels * cache_length * 2
    return decoder + head + kv


def timed(fn, device: torch.device, iters: int) -> float:
    """Median milliseconds of ``fn()`` after warm-up (CUDA events on CUDA)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


@torch.no_grad()
def kernel_check(model, device: torch.device) -> float:
    """Largest relative error of layer 0's quantized linears against their dequantized float32 matmul."""
    worst = 0.0
    generator = torch.Generator(device).manual_seed(1)
    for module in layer_linears(model.blocks[0]):
        if not isinstance(module, QuantizedLinear):
            continue
        x = torch.randn(4, module.in_features, generator=generator, device=device, dtype=torch.bfloat16)
        ref = F.linear(x.float(), module.dequantize(torch.float32))
        if module.bias is not None:
            ref = ref + module.bias.float()
        worst = max(worst, relative_error(module(x), ref))
    return worst


@torch.no_grad()
def layout_check(cpu_model, device: torch.device) -> str:
    """INT4 read back from the device's kernel layout equals what was packed; the aten INT8 kernel (where it
    exists for the device) against glmkit's INT8 forward, and its time for the layer's linears."""
    lines = []
    source = layer_linears(cpu_model.blocks[0])[2]  # dense_h_to_4h, the largest
    for group_size in (32, 128):
        module = Int4Linear.from_linear(copy.deepcopy(source).to(device), group_size)
        plain = module.weight.clone()
        module.pack()
        same = torch.equal(module.plain_weight(), plain)
        lines.append(f"INT4 g{group_size} layout {module.layout}: read back {'exact' if same else 'DIFFERENT'}")
    int8 = Int8Linear.from_linear(copy.deepcopy(source).to(device))
    x = torch.randn(1, int8.in_features, device=device, dtype=torch.bfloat16)
    try:
        aten = torch._weight_int8pack_mm(x, int8.weight, int8.weight_scale.to(x.dtype))
    except (RuntimeError, NotImplementedError) as exc:
        lines.append(f"aten _weight_int8pack_mm on {device.type}: not available ({str(exc).splitlines()[0][:80]})")
    else:
        error = relative_error(aten, int8(x))
        ms_aten = timed(lambda: torch._weight_int8pack_mm(x, int8.weight, int8.weight_scale), device, 50)
        ms_glmkit = timed(lambda: int8(x), device, 50)
        lines.append(
            f"aten _weight_int8pack_mm on {device.type}: rel err vs glmkit INT8 {error:.2e}, "
            f"{ms_aten:.3f} ms vs glmkit's {ms_glmkit:.3f} ms (dense_h_to_4h, eager)"
        )
    return "\n".join(lines)


@torch.no_grad()
def measure(model, device: torch.device, iters: int, compile_layer: bool) -> dict:
    cfg = model.config
    linears = layer_linears(model.blocks[0])
    hidden = torch.randn(1, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    wide = torch.randn(1, cfg.ffn_hidden_size, device=device, dtype=torch.bfloat16)

    def one_layer():
        qkv, dense, up, down = linears
        qkv(hidden), dense(hidden), up(hidden), down(wide)

    row = {"layer_ms": timed(one_layer, device, iters)}
    if compile_layer:
        row["layer_compiled_ms"] = timed(torch.compile(one_layer), device, iters)
    ids = torch.randint(100, cfg.padded_vocab_size - 1, (1, PROMPT + 1), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    cache = model.new_cache(1, PROMPT + 8)
    row["logits"] = model(ids[:, :PROMPT], cache=cache, last_only=True).logits.float().cpu()

    def step():
        model(ids[:, PROMPT:], cache=cache, last_only=True)
        cache.crop(PROMPT)

    row["model_ms"] = timed(step, device, iters)
    row["bytes"] = bytes_per_token(model, PROMPT + 1)
    row["kernel_err"] = kernel_check(model, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="bf16,int8,int4-g32,int4-g128")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--bandwidth", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layer linears")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    # on the CPU first, drawn on the device: quantizing layer by layer never holds the float model there
    config = TINY if args.tiny else FULL
    cpu_model = random_model(ChatGLM2ForConditionalGeneration, config, [torch.device("cpu")], torch.bfloat16, device)
    print(f"built the bf16 model on the CPU in {time.perf_counter() - t0:.0f} s; torch {torch.__version__}")
    print(layout_check(cpu_model, device))

    rows = {}
    for name in args.variants.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        model = variant(cpu_model, name, device)
        load_s = time.perf_counter() - t0
        rows[name] = measure(model, device, args.iters, args.compile) | {"load_s": load_s}
        if device.type == "cuda":
            rows[name]["weights_gib"] = torch.cuda.memory_allocated(device) / GiB
            rows[name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        del model

    header = (
        f"{'variant':<10} {'layer ms':>9} {'model ms':>9} {'tok/s':>7} {'GB/token':>9} {'GB/s':>7} "
        f"{'bound tok/s':>11} {'peak GiB':>9} {'kernel err':>10} {'logit err':>9} {'to device s':>11}"
    )
    if args.compile:
        header += f" {'layer ms (compiled)':>20}"
    print("\n" + header)
    first = next(iter(rows.values()))["logits"]
    for name, r in rows.items():
        line = (
            f"{name:<10} {r['layer_ms']:>9.3f} {r['model_ms']:>9.2f} {1e3 / r['model_ms']:>7.1f} "
            f"{r['bytes'] / GB:>9.3f} {r['bytes'] / GB / (r['model_ms'] / 1e3):>7.0f} "
            f"{args.bandwidth * GB / r['bytes']:>11.1f} {r.get('peak_gib', float('nan')):>9.2f} "
            f"{r['kernel_err']:>10.2e} {relative_error(r['logits'], first):>9.2e} {r['load_s']:>11.1f}"
        )
        if args.compile:
            line += f" {r['layer_compiled_ms']:>20.3f}"
        print(line)
    print(
        "\nlayer ms: the four linears of one decoder layer for one token; model ms: a whole forward for one token "
        f"after {PROMPT} cached; bound: --bandwidth / (bytes a token reads); kernel err: layer 0's quantized "
        "linears vs a float32 matmul of their dequantized weights (bf16 activations); logit err: the prompt's "
        "last logits vs the first variant's (random weights: a sanity check, not a quality figure)."
    )


if __name__ == "__main__":
    main()
