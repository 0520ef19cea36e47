"""A servable checkpoint of a benchmark shape: its seeded random weights with a real tokenizer, written with
`save_pretrained`, so that `lazyprefill serve`, `transformers serve` and `serve_load.py` can run a llama3-8b-sized
model on a machine that has no weights (issue 25: the lent GPU).

The shape's vocabulary becomes the tokenizer's (llama3-8b: 128,256 -> SmolLM2's 49,152 entries), which changes only
the embedding and the LM head; every layer keeps the shape's sizes. Random weights answer with random tokens and
rarely write the end-of-sequence one, so nearly every answer runs to `max_tokens`: about the same load for every
server.

    python3 benchmarks/shape_checkpoint.py --tokenizer-only smollm2 --out .gpu/tok     # here: the tokenizer's files
    python3 benchmarks/shape_checkpoint.py --shape llama3-8b --tokenizer .gpu/tok --out /root/ckpt --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lazyprefill.bench import random_model
from lazyprefill.bench.config import SHAPES
from lazyprefill.env import DTYPES
from lazyprefill.models import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--tokenizer", default="smollm2", help="a tokenizer folder, an embedded model's name or a hub name")
    p.add_argument("--tokenizer-only", metavar="SOURCE", help="write only SOURCE's tokenizer files to --out")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.tokenizer_only:
        load_tokenizer(args.tokenizer_only).save_pretrained(args.out)
        return
    tok = load_tokenizer(args.tokenizer)
    special = {f"{name}_id": getattr(tok, f"{name}_id") for name in ("bos_token", "eos_token", "pad_token")}
    model = random_model(args.shape, args.device, DTYPES[args.dtype], args.seed, vocab_size=len(tok), **special)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"{args.out}: {args.shape} with {tok.name_or_path}'s {len(tok)}-entry vocabulary, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {args.dtype}")


if __name__ == "__main__":
    main()
