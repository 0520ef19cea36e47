"""How deep the needles went, for needle samples a schedule answers wrongly: for the queried needle and for the one
whose value the model wrote instead, each token of its sentence with the deepest layer it reached in prefill.

A wrong answer whose queried needle went through every layer was not lost by the selection; the context it was read
in (what the pruned layers no longer attend to) changed which needle the model copied.

    PYTHONPATH=src python benchmarks/needle_depths.py --model gemma3-270m --length 4096 --samples 30 --indices 18,27 \\
        > results/gemma3-270m-cpu-4096-needles-default/needle-depths.txt
"""

from __future__ import annotations

import argparse
import sys

import torch

import lazyprefill as lp
from lazyprefill.eval import tasks
from lazyprefill.models import load_model

VALUE_TOKENS = 7  # RULER's needle values here: 7 digits, one token each (Gemma 3 and SmolLM2 split digits)


def spans(tok, ids: list[int], value: str) -> list[int]:
    """Start positions of `value` written as VALUE_TOKENS tokens in ids."""
    return [i for i in range(len(ids) - VALUE_TOKENS) if tok.decode(ids[i:i + VALUE_TOKENS]) == value]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--task", default="niah_multikey")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=30, help="as the evaluation built them (the split's seed)")
    p.add_argument("--indices", required=True, help="comma-separated sample indices")
    p.add_argument("--schedule", default="balanced")
    p.add_argument("--split", default="evaluation", choices=sorted(tasks.SPLITS))
    p.add_argument("--context", type=int, default=16, help="tokens shown before each value")
    args = p.parse_args()
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    lazy = lp.LazyLLM(model, args.schedule, tokenizer=tok)
    wanted = {int(i) for i in args.indices.split(",")}
    print(f"# {' '.join(sys.argv)}")
    for s in tasks.build(args.task, tok, args.length, args.samples, tasks.SPLITS[args.split]):
        if s.index not in wanted:
            continue
        out = lazy.generate(torch.tensor(s.prompt_ids), max_new_tokens=s.max_new_tokens, eos_token_id=[])
        depth = out.stats.prefill_depth  # [n_prompt]
        written = out.text.strip(": .\n")[:VALUE_TOKENS]
        print(f"sample {s.index}: asked for {s.reference}, wrote {out.text!r}; "
              f"{(depth == depth.max()).mean():.2f} of the prompt went through every layer")
        for name, value in (("queried", s.reference), ("written", written)):
            for i in spans(tok, s.prompt_ids, value):
                lo = max(0, i - args.context)
                cells = (f"{tok.decode([t])!r}:{d}" for t, d in zip(s.prompt_ids[lo:i + VALUE_TOKENS + 1], depth[lo:]))
                print(f"  {name} at {i}: " + " ".join(cells))


if __name__ == "__main__":
    main()
