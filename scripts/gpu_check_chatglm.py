"""Check the native ChatGLM families on CUDA.

1. Full-size ChatGLM3-6B and ChatGLM-6B shapes with random bf16 weights: forward, greedy decoding over
   the static KV cache (own loop and glmkit's engine), time and memory.
2. With two or more GPUs: the same weights spread over two GPUs (``num_gpus=2`` placement) give the
   same logits and tokens as one GPU.
3. With ``--conformance DIR``: the tiny conformance checkpoints on CUDA in float32 (TF32 off) against
   the reference's golden logits and greedy tokens.  ``DIR`` is made here, beside the checkout, by
   ``--pack-conformance ../shared/conformance DIR`` (fp16-exact weights stored as fp16, golden values
   of the forward/greedy cases only) so that it is small enough to travel with the working tree.

    PYTHONPATH=src python scripts/gpu_check_chatglm.py [--conformance DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from glmkit.bench.shapes import SHAPES, blank_model, model_class, prompt, randomize, vocab_size
from glmkit.engine import GenerationConfig, generate_tokens
from glmkit.models.chatglm import ChatGLMForConditionalGeneration
from glmkit.models.chatglm2 import ChatGLM2ForConditionalGeneration

FULL_SIZE = ("chatglm3-6b", "chatglm-6b")
FAMILY_CLASS = {"v1": ChatGLMForConditionalGeneration, "v3": ChatGLM2ForConditionalGeneration}
GiB = 2**30


def timed(fn, device_count: int) -> tuple[object, float]:
    for i in range(device_count):
        torch.cuda.synchronize(i)
    start = time.perf_counter()
    out = fn()
    for i in range(device_count):
        torch.cuda.synchronize(i)
    return out, time.perf_counter() - start


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[float], float]:
    """Own loop over the static cache: tokens, per-step seconds, prefill seconds."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    ndev = torch.cuda.device_count()
    logits, prefill = timed(lambda: model(ids, cache=cache, last_only=True).logits, ndev)
    tokens, step_times = [], []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits, seconds = timed(lambda t=token: model(t, cache=cache, last_only=True).logits, ndev)
        step_times.append(seconds)
    return torch.cat(tokens, 1)[0].tolist(), step_times, prefill


def check_full_size(name: str, prompt_length: int, steps: int, gpus: int) -> dict:
    shape = SHAPES[name]
    cls, config_class = model_class(shape.family)
    config = config_class.from_dict(shape.config)
    cuda0 = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats(0)
    model = blank_model(cls, config, [cuda0], torch.bfloat16)
    start = time.perf_counter()
    randomize(model, cuda0)
    torch.cuda.synchronize(0)
    init_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated(0) / GiB
    ids_list = prompt(shape, prompt_length, vocab_size(model), 1)
    ids = torch.tensor([ids_list], device=cuda0)

    with torch.inference_mode():
        logits = model(ids).logits
    finite = bool(torch.isfinite(logits).all())
    tokens, step_times, prefill = greedy(model, ids, steps)
    engine_tokens = generate_tokens(model, ids_list, GenerationConfig(max_new_tokens=16, do_sample=False))
    step_ms = statistics.median(step_times[2:]) * 1e3
    result = {
        "model": name,
        "params_billion": round(params / 1e9, 3),
        "random_init_s": round(init_s, 2),
        "weights_gib": round(weights_gib, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(0) / GiB, 2),
        "logits_finite": finite,
        "prompt_tokens": prompt_length,
        "prefill_ms": round(prefill * 1e3, 1),
        "prefill_tokens_per_s": round(prompt_length / prefill),
        "decode_ms_per_token_median": round(step_ms, 2),
        "decode_tokens_per_s": round(1e3 / step_ms, 1),
        "weight_bytes_floor_ms": round(weights_gib * GiB / 4.8e12 * 1e3, 2),  # H200 datasheet bandwidth
        "engine_greedy_equals_own_loop": engine_tokens == tokens[:16],
    }
    if gpus >= 2:
        devices = [cuda0, torch.device("cuda", 1)]
        split = blank_model(cls, config, devices, torch.bfloat16)
        split.load_state_dict(model.state_dict())  # the same weights, copied across
        with torch.inference_mode():
            split_logits = split(ids).logits
        split_tokens, split_steps, _ = greedy(split, ids, steps)
        diff = (split_logits.float() - logits.float()).abs().max().item()
        layers_on = [next(b.parameters()).device.index for b in split.blocks]
        result["split_2gpu"] = {
            "layers_per_gpu": [layers_on.count(0), layers_on.count(1)],
            "max_abs_logit_diff_vs_1gpu": diff,
            "allclose_bf16": bool(torch.allclose(split_logits, logits, atol=1e-2, rtol=1e-2)),
            "greedy_tokens_equal": split_tokens == tokens,
            "decode_ms_per_token_median": round(statistics.median(split_steps[2:]) * 1e3, 2),
            "gib_per_gpu": [round(torch.cuda.memory_allocated(i) / GiB, 2) for i in range(2)],
        }
        del split
    del model, logits
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def check_conformance(pack: Path) -> list[dict]:
    """Tiny checkpoints on CUDA in float32 against the reference's golden outputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for family in ("v1", "v3"):
        tol = 1e-4 if family == "v1" else 5e-4
        model = FAMILY_CLASS[family].from_pretrained(pack / family, device="cuda")
        golden = torch.load(pack / family / "golden.pt", weights_only=True)
        for case in golden:
            inputs = {k: v.cuda() for k, v in case["inputs"].items()}
            logits = model(case["input_ids"].cuda(), **inputs).logits[:, -1].float().cpu()
            ratio = ((logits - case["final"]).abs() / (tol + tol * case["final"].abs())).max().item()
            entry = {"family": family, "case": case["name"], "tolerance_ratio": round(ratio, 4)}
            if case["input_ids"].shape[0] == 1 and "new_tokens" in case:
                got = generate_tokens(
                    model, case["input_ids"][0].tolist(), GenerationConfig(max_new_tokens=20, do_sample=False)
                )
                entry["greedy_equal"] = got == case["new_tokens"]
            results.append(entry)
    return results


def pack_conformance(source: Path, target: Path) -> None:
    """Make the small copy of the conformance data that ``--conformance`` reads (runs on the CPU)."""
    from safetensors.torch import load_file, save_file

    for family, folder in (("v1", "chatglm_v1"), ("v3", "chatglm_v3")):
        out = target / family
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_bytes((source / folder / "checkpoint" / "config.json").read_bytes())
        tensors = load_file(str(source / folder / "checkpoint" / "model.safetensors"))
        save_file({k: v.half() for k, v in tensors.items()}, str(out / "model.safetensors"))  # fp16-exact
        expected = json.loads((source / folder / "expected.json").read_text(encoding="utf-8"))
        by_name = {c["name"]: c for c in expected["cases"]}
        golden = []
        for case in expected["cases"]:
            final = case["final_position_logits"]
            if isinstance(final, str):  # "identical to case X"
                final = by_name[final.removeprefix("identical to case ").split()[0]]["final_position_logits"]
            inputs = {}
            if family == "v1":
                if case.get("passed_attention_mask"):
                    inputs["attention_mask"] = torch.tensor(case["attention_mask_used"]).bool()
                if case.get("passed_position_ids"):
                    inputs["position_ids"] = torch.tensor(case["position_ids_used"])
            else:
                inputs = {k: torch.tensor(v) for k, v in case.get("model_inputs_passed", {}).items()}
            entry = {
                "name": case["name"],
                "input_ids": torch.tensor(case["input_ids"]),
                "inputs": inputs,
                "final": torch.tensor(final, dtype=torch.float32),
            }
            if "greedy_generate" in case:
                entry["new_tokens"] = case["greedy_generate"]["new_tokens"][0]
            golden.append(entry)
        torch.save(golden, out / "golden.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conformance", type=Path, help="a folder made by --pack-conformance")
    parser.add_argument("--pack-conformance", nargs=2, type=Path, metavar=("SOURCE", "TARGET"))
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.pack_conformance:
        pack_conformance(*args.pack_conformance)
        return

    gpus = torch.cuda.device_count()
    report: dict = {
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
    }
    if args.conformance:
        report["conformance_fp32_cuda"] = check_conformance(args.conformance)
    report["full_size_bf16"] = [check_full_size(name, args.prompt_tokens, args.steps, gpus) for name in FULL_SIZE]
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
