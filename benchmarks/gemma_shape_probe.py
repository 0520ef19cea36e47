"""TTFT, whole-answer time and peak memory of Gemma 3 270M's shape with random fp32 weights on a GPU: what a long
evaluation of the real model will cost there (dense, the presets, and random pruning's revivals in decoding), with
no weights to carry. Three runs per schedule and length; the first of each includes the schedule's compilation.

    python3 benchmarks/gemma_shape_probe.py --lengths 16384,32704 \\
        --schedules "dense,long,random:long,balanced,dense+sparse(min_tokens=16384)"
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

import lazyprefill as lp
from lazyprefill.schedule import split_list

# google/gemma-3-270m's text config (the embedded gemma3-270m), as transformers 5.17 writes it
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, rms_norm_eps=1e-6,
    rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16384,32704")
    p.add_argument("--schedules", default="dense,long,random:long,balanced", help="comma-separated schedule specs")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the evaluations run in full fp32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**GEMMA3_270M), dtype=torch.float32).cuda().eval()
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(3, GEMMA3_270M["vocab_size"], (n,))
        for spec in split_list(args.schedules):
            lazy = lp.LazyLLM(model, schedule=spec)
            torch.cuda.reset_peak_memory_stats()
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                out = lazy.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
                runs.append((out.ttft_s, time.perf_counter() - start))
            print(f"{n} {spec:12s} ttft {[round(a, 3) for a, _ in runs]} total {[round(b, 3) for _, b in runs]} "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
                  f"computed {out.stats.prefill_computed[::6]}", flush=True)
            lazy.release()


if __name__ == "__main__":
    main()
