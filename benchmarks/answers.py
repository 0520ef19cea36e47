"""Whole answers (MEASURE.md): TTFT, steady decoding ms/token beside the bandwidth floor, and the total for 128
and 512 new tokens, for transformers `generate` (eager and static cache, compiled), lazyprefill dense and every
schedule preset, in one process per chunk. One run of max(--new-tokens) tokens per method gives every total.

The lent GPU runs 10-minute commands and has no lazyprefill install: run one chunk (model, length, batch) per
call, with its JSON checkpointed after every method (a chunk killed by the limit keeps what it measured), then
join the chunks here:

    PYTHONPATH=src python3 benchmarks/answers.py --models llama2-7b --lengths 8192 --batch-sizes 1 \\
        --out $OUT --stem answers-llama2-7b-8k-b1
    python benchmarks/answers.py --merge benchmarks/results/answers/chunks/*.json --stem answers

Rough device time per chunk on an H100 with today's engine (each method: a warm-up run of the same shape with 16
tokens, then 512 tokens; transformers-static adds its compilation, about 1-2 min): 8K x1 about 4 min; 32K x1 about
5 min; 8K x8 about 7 min; 32K x8 (llama3-8b; llama2-7b's 140 GB of K/V is recorded as "does not fit" at once)
more than 10 min: split it by --methods (e.g. transformers,transformers-static / dense,paper,aggressive). A first
smoke chunk checks the GPU path (compilation included) in 1-2 min: --models tiny --lengths 1024 --batch-sizes 1,2.

Under torchrun every method runs tensor-parallel over the job's ranks (lazyprefill.parallel; a shape's random
weights are drawn whole with the same seed on every rank, then split), and rank 0 alone prints and writes:

    torchrun --nproc-per-node 2 benchmarks/answers.py --models llama3-8b --lengths 32768 --batch-sizes 1 \
        --out $OUT --stem answers-llama3-8b-32k-tp2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from lazyprefill import answers, parallel
from lazyprefill.bench import add_compile_arguments, use_compile_arguments
from lazyprefill.engine import DecodeOptions
from lazyprefill.schedule import split_list


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names, default=["llama2-7b", "llama3-8b"],
                   help="shapes with random weights (llama2-7b, llama3-8b, tiny, smollm2-shape), smollm2 or a path")
    p.add_argument("--lengths", type=_ints, default=[8192, 32768], help="prompt lengths, e.g. 8192,32768")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8], help="batches of equal-length prompts")
    p.add_argument("--task", help="prompts from this eval task's samples (a document and a question; real models "
                                  "only), e.g. recall; default: random token ids")
    p.add_argument("--new-tokens", type=_ints, default=[128, 512],
                   help="totals reported; one run of the largest count gives them all")
    p.add_argument("--methods", type=split_list,
                   help=f"a subset of {','.join(answers.method_names())} and schedule specs such as "
                        "'revive(rows=8):balanced' (default: the named ones)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rounds", type=int, default=1,
                   help="timed runs per method, the methods taking turns; rows report medians over rounds")
    p.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of each method's warm-up run")
    p.add_argument("--steady-skip", type=int, default=8, help="decoding steps left out of the steady state")
    p.add_argument("--copy-mb", type=int, default=1024, help="size of the copy that measures bandwidth")
    p.add_argument("--memory-limit-gb", type=float, help="check fits against this, not the GPU's free memory")
    for name in ("burst-kernel", "compile"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                       help=f"ours: DecodeOptions({name.replace('-', '_')}=True / False; default: by device)")
    add_compile_arguments(p, "ours: ")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="join chunk results instead of measuring")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/answers"))
    p.add_argument("--stem", help="output file name without extension (default: answers-<models>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    stem = args.stem or "-".join(["answers", *args.models])
    tp = 1
    if parallel.launched():  # under torchrun: join the job before any model is built (each rank takes its GPU)
        parallel.init()
        tp = torch.distributed.get_world_size()
    main_rank = parallel.is_main()
    if args.merge:
        result = answers.merge([json.loads(path.read_text()) for path in args.merge])
    else:
        use_compile_arguments(args)
        cfg = answers.AnswerConfig(
            models=args.models, lengths=args.lengths, batch_sizes=args.batch_sizes, new_tokens=args.new_tokens,
            methods=args.methods, device=args.device, dtype=args.dtype, warmup_tokens=args.warmup_tokens,
            steady_skip=args.steady_skip, copy_mb=args.copy_mb, memory_limit_gb=args.memory_limit_gb,
            decode=DecodeOptions(burst_kernel=args.burst_kernel, compile=args.compile), rounds=args.rounds, tp=tp,
            task=args.task,
        )
        total = len(cfg.models) * len(cfg.lengths) * len(cfg.batch_sizes) * cfg.runs_per_case()

        def checkpoint(partial: dict) -> None:
            if main_rank:
                answers.write_json(partial, args.out, stem)

        with tqdm(total=total, desc="answers", disable=not main_rank) as bar:
            def progress(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)

            launcher = ["torchrun", f"--nproc-per-node={tp}"] if tp > 1 else ["python"]
            command = shlex.join([*launcher, "benchmarks/answers.py", *(sys.argv[1:] if argv is None else argv)])
            result = answers.run(cfg, progress, checkpoint, command)
    if not main_rank:
        return result
    paths = answers.write(result, args.out, stem)
    print(answers.markdown(result))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return result


if __name__ == "__main__":
    main()
