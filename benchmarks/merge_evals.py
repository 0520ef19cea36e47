"""Merge `lazyprefill eval` folders of one model, split and seed into one report folder.

Long evaluations run as several processes (one per task, or extra schedules added later on the same
samples, each with its own dense run); this joins their complete samples and rebuilds the report with
`eval --report-only`. A method already merged for a sample is not taken again (the dense answers of
all runs come from one dense-result cache, so they are the same answers). `--rename OLD=NEW` gives a
schedule-file method a readable name; `--ideal-from MODEL` recomputes every record's ideal speedup
from the token counts it recorded (`prefill_computed`), with that model's FLOP count.

    python benchmarks/merge_evals.py OUT DIR [DIR ...] [--rename OLD=NEW ...] [--ideal-from gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lazyprefill.eval import complete_records, report_from_log, sample_key

SAME = ("model", "split", "seed", "device", "dtype", "num_layers")


def merge(out: Path, dirs: list[Path], rename: dict[str, str]) -> dict:
    """Write OUT/config.json and OUT/records.jsonl from the folders' complete samples; returns the config."""
    config: dict | None = None
    methods: dict[str, dict] = {}
    records, seen = [], set()
    for folder in dirs:
        cfg = json.loads((folder / "config.json").read_text())
        if config is None:
            config = {**cfg, "tasks": [], "lengths": [], "merged_from": []}
        differ = [k for k in SAME if cfg.get(k) != config.get(k)]
        if differ:
            raise SystemExit(f"{folder} differs from {dirs[0]} in {', '.join(differ)}: not the same evaluation")
        config["merged_from"].append(folder.name)
        config["tasks"] += [t for t in cfg["tasks"] if t not in config["tasks"]]
        config["lengths"] += [n for n in cfg["lengths"] if n not in config["lengths"]]
        for m in cfg["methods"]:
            m = {k: rename.get(v, v) if k in ("name", "schedule", "base") else v for k, v in m.items()}
            methods.setdefault(m["name"], m)
        for r in complete_records(folder, len(cfg["methods"])):
            r = {**r, "method": rename.get(r["method"], r["method"]), "base": rename.get(r["base"], r["base"])}
            key = (r["method"], *sample_key(r))
            if key not in seen:
                seen.add(key)
                records.append(r)
    assert config is not None
    config["methods"] = list(methods.values())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return config


def recompute_ideal(out: Path, model: str) -> None:
    """Rewrite OUT's ideal speedups with today's FLOP count (runs made before it counted sliding windows)."""
    from lazyprefill.flops import ModelDims, ideal_speedup
    from lazyprefill.models import load_model

    dims = ModelDims.of(load_model(model, quiet=True)[0])
    path = out / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in records:
        r["ideal_speedup"] = ideal_speedup(dims, r["prefill_computed"])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--rename", action="append", default=[], help="OLD=NEW method name")
    parser.add_argument("--ideal-from", help="recompute ideal speedups with this model's FLOP count")
    args = parser.parse_args()
    rename = dict(pair.split("=", 1) for pair in args.rename)
    merge(args.out, args.dirs, rename)
    if args.ideal_from:
        recompute_ideal(args.out, args.ideal_from)
    result = report_from_log(args.out)
    print(f"{args.out}: {result['config']['complete_samples']} complete samples, {len(result['records'])} records")


if __name__ == "__main__":
    main()
