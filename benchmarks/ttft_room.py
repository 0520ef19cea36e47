"""TTFT (prefill + first logits) of a SmolLM2-135M-shaped random model on the CPU, with room for 8 or 8000 new
tokens: the cache kept for new tokens must not cost prefill time. Run once per checkout to compare:
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/ttft_room.py LABEL
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lazyprefill as lp
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import Engine

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 16384,
                "tie_word_embeddings": True}


def main(label: str, n: int = 1024, rooms: tuple[int, ...] = (8, 8000), repeats: int = 3) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    config._attn_implementation = "sdpa"
    adapter = adapter_for(LlamaForCausalLM(config).eval())
    ids = torch.randint(0, config.vocab_size, (n,))
    schedule = lp.parse_schedule("dense", config.num_hidden_layers)
    ms: dict[int, list[float]] = {room: [] for room in rooms}
    with torch.inference_mode():
        for _ in range(repeats):  # interleaved, so that drift on a shared machine hits every room alike
            for room in rooms:
                start = time.perf_counter()
                Engine(adapter, schedule, n + room).prefill([ids])
                ms[room].append((time.perf_counter() - start) * 1e3)
    medians = {room: round(statistics.median(v)) for room, v in ms.items()}
    print(label, {room: [round(x) for x in v] for room, v in ms.items()}, "median ms:", medians)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
