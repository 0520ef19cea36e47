"""Split a merged `lazyprefill eval` folder back into one folder per task and length, for `--resume`.

`gemma_long_accuracy.sh` runs one process per task into OUT/LENGTH-TASK-TAG, and a lease often ends with some tasks
part done; merge_evals.py joins what finished. A later lease that runs some of the same methods on the same samples
continues from those samples instead of computing them again: this writes each folder that `--resume` reads
(config.json and records.jsonl, with only the named methods' complete samples), then
`gemma_long_accuracy.sh OUT LENGTH SAMPLES TASKS --resume` runs the rest.

    python benchmarks/split_eval.py MERGED OUT --method dense --method 'SPEC' --tag TAG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lazyprefill.eval import complete_records, sample_key


def split(merged: Path, out: Path, methods: list[str], tag: str) -> dict[str, int]:
    """Write OUT/LENGTH-TASK-TAG per task and length of MERGED; returns each folder's complete samples."""
    config = json.loads((merged / "config.json").read_text())
    chosen = [m for m in config["methods"] if m["name"] in methods]
    missing = sorted(set(methods) - {m["name"] for m in chosen})
    if missing:
        raise SystemExit(f"{merged} has no method {missing}; it has {[m['name'] for m in config['methods']]}")
    records = [r for r in complete_records(merged, len(config["methods"])) if r["method"] in methods]
    done: dict[str, int] = {}
    for task, length in sorted({(r["task"], r["length"]) for r in records}):
        folder = out / f"{length}-{task}{'-' + tag if tag else ''}"
        folder.mkdir(parents=True, exist_ok=True)
        part = {
            **config, "tasks": [task], "lengths": [length], "methods": chosen,
            "schedules": {k: v for k, v in config["schedules"].items() if k in methods},
        }
        (folder / "config.json").write_text(json.dumps(part, indent=1))
        mine = [r for r in records if (r["task"], r["length"]) == (task, length)]
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
        done[folder.name] = len({sample_key(r) for r in mine})
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("merged", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--method", action="append", required=True, help="a method name to keep (repeat)")
    parser.add_argument("--tag", default="", help="the folders' suffix, as gemma_long_accuracy.sh's TAG")
    args = parser.parse_args()
    for name, n in split(args.merged, args.out, args.method, args.tag).items():
        print(f"{args.out / name}: {n} complete samples")


if __name__ == "__main__":
    main()
