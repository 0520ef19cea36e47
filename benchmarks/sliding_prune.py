"""Where may a sliding-window model prune? Gemma 3 270M, passkey and recall, pruning at full vs sliding layers.

At a sliding layer (window 512 on Gemma 3 270M) the last token's real attention covers only the last
512 positions, so the paper's score is undefined for the rest of a long prompt. This runs the same
keep ratios at the full-attention layers (5, 11) and one layer earlier, at sliding layers (4, 10),
where the score row ignores the window (the alternative to refusing them), plus each with random
selection at the same counts. lazyprefill refuses sliding pruning layers on a model that has full
ones, so the sliding schedules are set on the LazyLLM objects directly here, past that check.

    python benchmarks/sliding_prune.py --samples 8 --length 2048 --out results/gemma3-270m-cpu-sliding

Uses a sample seed (1) different from the reported evaluation's (0): the choice is made on one split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lazyprefill.bench import machine_info
from lazyprefill.eval import Method, Runner, write_report
from lazyprefill.eval import tasks as eval_tasks
from lazyprefill.generation import LazyLLM
from lazyprefill.models import load_model
from lazyprefill.schedule import parse_schedule

FULL, SLIDING = "5:0.5,11:0.5", "4:0.5,10:0.5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="dense-result cache [default: OUT/dense-cache]")
    ap.add_argument("--out", type=Path, default=Path("results/gemma3-270m-cpu-sliding"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("gemma3-270m", quiet=True)
    runner = Runner(model, tokenizer, "gemma3-270m|float32|cpu", args.cache or args.out / "dense-cache")
    for spec in (SLIDING, f"random:{SLIDING}"):  # past LazyLLM's refusal of sliding pruning layers
        lazy = LazyLLM(model, None, tokenizer=tokenizer)
        lazy.schedule = parse_schedule(spec, runner.num_layers)
        runner._lazy[spec] = lazy
    methods = [Method("dense", "dense", "dense", "")]
    for spec, name in ((FULL, "full 5,11"), (SLIDING, "sliding 4,10")):
        methods += [Method(name, "lazy", spec, spec), Method(f"random:{name}", "random", f"random:{spec}", spec)]
    samples = eval_tasks.build_all(("passkey", "recall"), tokenizer, (args.length,), args.samples, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": "gemma3-270m", "tasks": ["passkey", "recall"], "samples": args.samples, "lengths": [args.length],
        "seed": args.seed, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
        "num_layers": runner.num_layers, "methods": [vars(m) for m in methods], "machine": machine_info(model.device),
        "command": "python benchmarks/sliding_prune.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None),
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    started = time.time()
    with open(args.out / "records.jsonl", "w") as log:
        records = runner.run(samples, methods, on_record=lambda r: (log.write(json.dumps(r) + "\n"), log.flush()))
    config["wall_s"] = time.time() - started
    write_report(config, records, args.out, {})


if __name__ == "__main__":
    main()
