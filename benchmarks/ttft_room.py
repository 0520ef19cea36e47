"""TTFT (prefill + first logits) of a SmolLM2-135M-shaped random model on the CPU, with room for 8 or 8000 new
tokens: the cache for new tokens must not cost prefill time. Run once per checkout to compare:
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

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=16384, tie_word_embeddings=True)
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg).eval()
adapter = adapter_for(model)
ids = torch.randint(0, 49152, (1024,))
sched = lp.parse_schedule("dense", 30)
out = {}
with torch.inference_mode():
    for new in (8, 8000, 8, 8000, 8, 8000):
        t0 = time.perf_counter()
        Engine(adapter, sched, 1024 + new).prefill([ids])
        out.setdefault(new, []).append((time.perf_counter() - t0) * 1e3)
print(sys.argv[1], {k: [round(x) for x in v] for k, v in out.items()}, "median ms:", {k: round(statistics.median(v)) for k, v in out.items()})
