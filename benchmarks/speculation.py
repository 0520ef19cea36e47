"""Speculation on and off, from profile_stages.py outputs: steady decoding step time (wall and kernels) per case.

Each `<model>-<length>-b<batch>-<variant>.txt` in a folder holds profile_stages.py's output for one variant:
`spec` (DecodeOptions(speculate=True), guesses of at least 32 rows a segment over the batch), `spec32` (the earlier
rule: at least 32 rows per sequence) or `nospec` (a wait per pruning layer that reselects). Wall minus kernels is
the time the GPU idled on the host. Writes speculation.{json,md,png} into the folder:

    python benchmarks/speculation.py benchmarks/results/decode/speculation-h200
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LINE = re.compile(r"^== decode after (\d+) x (\d+) (\S+) .*wall ([\d.]+) ms, kernels ([\d.]+) ms")
NAME = re.compile(r"^(?P<model>.+)-(?P<length>\d+k)-b(?P<batch>\d+)-(?P<variant>spec32|spec|nospec)$")
VARIANTS = ("nospec", "spec", "spec32")


def read(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.txt")):
        name = NAME.match(path.stem)
        if name is None:
            continue
        for line in path.read_text().splitlines():
            m = LINE.match(line)
            if m and m[3] != "transformers":
                rows.append({"model": name["model"], "length": int(m[2]), "batch": int(m[1]),
                             "variant": name["variant"], "method": m[3], "wall_ms": float(m[4]),
                             "kernels_ms": float(m[5]), "source": path.name})
    return rows


def markdown(rows: list[dict]) -> str:
    cases = sorted({(r["model"], r["length"], r["batch"], r["method"]) for r in rows})
    lines = ["Steady decoding step, mean ms (wall / kernels) over 8 profiled steps after 72 (profile_stages.py).", "",
             "| model | prompt x batch | method | " + " | ".join(VARIANTS) + " |", "|---|---|---|---:|---:|---:|"]
    for model, length, batch, method in cases:
        cells = []
        for v in VARIANTS:
            r = next((r for r in rows if (r["model"], r["length"], r["batch"], r["method"], r["variant"])
                      == (model, length, batch, method, v)), None)
            cells.append("—" if r is None else f"{r['wall_ms']:.2f} / {r['kernels_ms']:.2f}")
        lines.append(f"| {model} | {length // 1024}K x{batch} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    cases = sorted({(r["model"], r["length"], r["batch"], r["method"]) for r in rows if r["method"] != "dense"})
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / (len(VARIANTS) + 1)
    for i, v in enumerate(("dense", *VARIANTS)):
        heights = []
        for model, length, batch, method in cases:
            want = (model, length, batch, "dense") if v == "dense" else (model, length, batch, method)
            match = [r["wall_ms"] for r in rows if (r["model"], r["length"], r["batch"], r["method"]) == want
                     and (v == "dense" or r["variant"] == v)]
            heights.append(min(match) if match else 0.0)
        ax.bar([c + i * width for c in range(len(cases))], heights, width, label=v)
    ax.set_xticks([c + 1.5 * width for c in range(len(cases))],
                  [f"{m}\n{n // 1024}K x{b}\n{meth}" for m, n, b, meth in cases], fontsize=8)
    ax.set_ylabel("ms per decoding step (wall)")
    ax.set_title("Speculation on and off (H200, random bf16 weights, steady state)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    folder = p.parse_args().folder
    rows = read(folder)
    (folder / "speculation.json").write_text(json.dumps(
        {"kind": "speculation", "command": f"python benchmarks/speculation.py {folder}", "rows": rows}, indent=1))
    (folder / "speculation.md").write_text(markdown(rows))
    plot(rows, folder / "speculation.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
