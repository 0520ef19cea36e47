"""Run one chunk of a benchmark preset and write its JSON, table and plot.

The GPU machine has no lazyprefill install and a 10-minute limit per command, so the `gpu` preset is
run in chunks there and joined here with `report.py`:

    PYTHONPATH=src python3 benchmarks/run.py --preset gpu --models llama2-7b --lengths 4096,8192 --out $OUT
    PYTHONPATH=src python3 benchmarks/run.py --preset gpu-batch --models llama2-7b --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from lazyprefill import bench


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(bench.BENCH_PRESETS), default="gpu")
    p.add_argument("--models", help="comma-separated shapes (llama2-7b, llama3-8b, tiny), smollm2 or paths")
    p.add_argument("--lengths", type=_ints, help="prompt lengths, e.g. 4096,8192")
    p.add_argument("--decode-lengths", type=_ints, help="prompts after which decoding is timed ('' for none)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--decode-repeats", type=int)
    p.add_argument("--batch-sizes", type=_ints, help="batched TTFT and decoding, e.g. 1,4,8 ('' for none)")
    p.add_argument("--batch-length", type=int, help="prompt length of every sequence of a batch")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", help="output file name without extension (default: preset and models)")
    args = p.parse_args()
    cfg = bench.configure(
        args.preset, args.models.split(",") if args.models else None, args.lengths, args.decode_lengths,
        args.repeats, args.warmup, args.decode_repeats, args.batch_sizes, args.batch_length,
    )
    with tqdm(total=bench.progress_total(cfg), desc="bench") as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        result = bench.run(cfg, progress)
    stem = args.stem or "-".join([args.preset, *cfg.lengths])
    paths = bench.write(result, args.out, stem)
    print(bench.markdown(result))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
