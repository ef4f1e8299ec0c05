"""`glmkit train` end to end on a GPU, with and without compiled layers, on rows of varied length.

scripts/bench_train.py times fixed-shape steps; this runs the real command (data loading, padding to
each batch's longest row, the logger, checkpoints) on a random-weight Llama-architecture checkpoint
written here, so the cost of recompiling for new sequence lengths shows in the figures.  The
tokenizer and chat template come from ``--tokenizer-dir`` (any Llama-family model directory, e.g.
the bundled demo model's); the weights are random, the data synthetic (no download needed).

    python scripts/bench_train_cli.py --tokenizer-dir ~/.cache/glmkit/models/SmolLM2-135M-Instruct-*
    python scripts/bench_train_cli.py --tokenizer-dir DIR --tiny --device cpu --steps 4   # checks it runs

Prints, per mode: the whole command's wall time, the tokens/s of the logged windows after the first
(the first holds the compile), the peak GPU memory the run reported and the last loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
WORDS = ("the", "a", "model", "learns", "from", "rows", "of", "text", "that", "differ", "in", "length")


def write_checkpoint(out: Path, tokenizer_dir: Path, tiny: bool, device: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((tokenizer_dir / "config.json").read_text())
    sizes = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}
        if tiny
        else {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 4}
    )  # fmt: skip
    config = LlamaConfig(**{**base, **sizes, "head_dim": sizes["hidden_size"] // sizes["num_attention_heads"]})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)


def write_data(path: Path, rows: int) -> None:
    rng = random.Random(0)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": words(10, 120), "output": words(20, 250)}) + "\n")


def run(mode: str, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"out-{mode}"
    command = [
        sys.executable, "-m", "glmkit", "train", "--model", str(work / "model"), "--data", str(work / "data.jsonl"),
        "--method", "lora", "--max-steps", str(args.steps), "--batch-size", str(args.batch),
        "--logging-steps", str(args.logging_steps), "--save-steps", "0", "--output-dir", str(out),
        "--overwrite-output-dir", "--max-seq-length", "512", "--device", args.device,
        "--compile" if mode == "compiled" else "--no-compile",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "tokens_per_second" in r]
    steady = [r["tokens_per_second"] for r in steps[1:]] or [steps[0]["tokens_per_second"]]
    return {"wall_seconds": round(wall, 1), "first_window_tokens_per_second": steps[0]["tokens_per_second"],
            "steady_tokens_per_second": statistics.median(steady), "last_loss": steps[-1]["loss"],
            "peak_memory_gib": max((r.get("peak_memory_gib") or 0) for r in steps) or None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("bench_train_cli"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("bench_train_cli.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.work / "model", args.tokenizer_dir, args.tiny, "cuda" if args.device != "cpu" else "cpu")
    write_data(args.work / "data.jsonl", args.steps * args.batch)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {mode: run(mode, args.work, args) for mode in ("eager", "compiled")}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'mode':<10} {'wall s':>8} {'first tok/s':>12} {'steady tok/s':>13} {'last loss':>10} {'peak GiB':>9}")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:<10} error: {r['error']}")
            continue
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] else "-"
        print(f"{mode:<10} {r['wall_seconds']:>8.1f} {r['first_window_tokens_per_second']:>12.0f} "
              f"{r['steady_tokens_per_second']:>13.0f} {r['last_loss']:>10.4f} {peak:>9}")  # fmt: skip
    eager, compiled = results["eager"], results["compiled"]
    if "error" not in eager and "error" not in compiled:
        ratio = compiled["steady_tokens_per_second"] / eager["steady_tokens_per_second"]
        print(f"compiled / eager, steady tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
