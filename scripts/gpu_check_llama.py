"""CUDA check of the native Llama family (the demo model's architecture) and the batch scheduler.

Builds a random Llama of the demo model's shape (SmolLM2-135M: hidden 576, 30 layers, 9 heads, 3 kv
heads, vocab 49152) with transformers, saves it, loads it through glmkit on CUDA and checks:
logits against transformers on the same weights (fp32 and bf16), greedy tokens with and without the
KV cache, and concurrent greedy requests through the batch scheduler against each request alone.

    PYTHONPATH=src python3 scripts/gpu_check_llama.py
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time

import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as ReferenceLlama

from glmkit.engine import Engine, GenerationConfig, generate_tokens
from glmkit.engine.scheduler import Scheduler
from glmkit.models import load_model


class DigitTokenizer:
    """Enough of a tokenizer for the engine: ids print as numbers."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"{i} " for i in ids)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def collect(scheduler: Scheduler, prompt: list[int], config: GenerationConfig) -> str:
    inbox: queue.Queue = queue.Queue()
    scheduler.submit(prompt, config, inbox.put)
    text = ""
    while True:
        item = inbox.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        text += item.text
        if item.finish_reason:
            return text


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as folder:
        ReferenceLlama(config).save_pretrained(folder)
        ids = torch.randint(0, 49152, (2, 64), device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            ours = load_model(folder, dtype=dtype, device="cuda")
            reference = ReferenceLlama.from_pretrained(folder, dtype=dtype).cuda().eval()
            with torch.inference_mode():
                error = relative_error(ours(ids).logits, reference(ids).logits)
                report[f"logits_relative_error_{str(dtype)[6:]}"] = error
        prompt = ids[0, :20].tolist()
        greedy = GenerationConfig(do_sample=False, max_new_tokens=32)
        cached = generate_tokens(ours, prompt, greedy)  # bf16 model from the loop above
        report["bf16_greedy_cache_equals_recompute"] = cached == generate_tokens(ours, prompt, greedy, use_cache=False)

        model = load_model(folder, dtype=torch.float32, device="cuda")
        engine = Engine(model, DigitTokenizer())
        prompts = [ids[i % 2, : 8 + 5 * i].tolist() for i in range(8)]
        alone = [engine.generate(p, greedy).text for p in prompts]
        scheduler = Scheduler(engine, max_active=8)
        results: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, collect(scheduler, prompts[i], greedy)))
            for i in range(8)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report["scheduler_8_requests_seconds"] = round(time.perf_counter() - start, 3)
        report["scheduler_batched"] = scheduler.batched
        scheduler.close()
        report["scheduler_equals_alone"] = [results[i] == alone[i] for i in range(8)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
