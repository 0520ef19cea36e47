"""TTFT of a SmolLM2-135M-shaped random model on the CPU with room for few or many new tokens: the cache kept for
new tokens must cost the first token nothing. Two clocks per run, each a fresh LazyLLM (so each run allocates its
cache, the worst case): `ttft_s` as generate reports it, and the wall time from calling generate to the first
token reaching `on_token` (what a streaming user waits for: it includes building the engine). Interleaved
rounds, median of 5. Writes JSON and a plot:
  OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/ttft_room.py --out benchmarks/results/decode/ttft-room-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lazyprefill as lp
from lazyprefill.env import machine_info

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 16384,
                "tie_word_embeddings": True}


def first_token_s(model, schedule: str, ids: list[int], room: int) -> tuple[float, float]:
    """(ttft_s as generate reports it, wall seconds from the call to the first token at `on_token`) of a fresh
    LazyLLM asked for `room` new tokens; every id is an EOS, so the run ends at its first token."""
    lazy = lp.LazyLLM(model, schedule)
    reached: list[float] = []
    start = time.perf_counter()
    out = lazy.generate(ids, max_new_tokens=room, eos_token_id=list(range(lazy.adapter.vocab_size)),
                        on_token=lambda _token: reached.append(time.perf_counter()))
    return out.ttft_s, reached[0] - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="100,1024")
    p.add_argument("--rooms", default="2,8000")
    p.add_argument("--schedules", default="dense,balanced")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode/ttft-room-cpu"))
    args = p.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    lengths, rooms = [int(x) for x in args.lengths.split(",")], [int(x) for x in args.rooms.split(",")]
    schedules = args.schedules.split(",")
    runs: dict[str, dict[str, list[float]]] = {}
    for n in lengths:
        ids = torch.randint(0, config.vocab_size, (n,)).tolist()
        for _ in range(args.repeats):  # rounds: drift on a shared machine hits every room alike
            for schedule in schedules:
                for room in rooms:
                    ttft, wall = first_token_s(model, schedule, ids, room)
                    cell = runs.setdefault(f"{n} {schedule} {room}", {"ttft_s": [], "first_token_wall_s": []})
                    cell["ttft_s"].append(ttft)
                    cell["first_token_wall_s"].append(wall)
    rows = []
    for key, cell in runs.items():
        n, schedule, room = key.split()
        rows.append({"prompt": int(n), "schedule": schedule, "room": int(room),
                     **{f"{k}_median": statistics.median(v) for k, v in cell.items()}, **cell})
    for row in rows:
        base = next(r for r in rows if (r["prompt"], r["schedule"], r["room"]) == (row["prompt"], row["schedule"],
                                                                                   rooms[0]))
        row["ttft_vs_smallest_room"] = row["ttft_s_median"] / base["ttft_s_median"]
        row["wall_vs_smallest_room"] = row["first_token_wall_s_median"] / base["first_token_wall_s_median"]
        ttft, wall = row["ttft_s_median"] * 1e3, row["first_token_wall_s_median"] * 1e3
        print(f"{row['prompt']:>5} {row['schedule']:>9} room {row['room']:>5}: ttft {ttft:7.1f} ms"
              f" ({row['ttft_vs_smallest_room']:.3f}x), first token {wall:7.1f} ms"
              f" ({row['wall_vs_smallest_room']:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"kind": "ttft_room", "machine": machine_info(torch.device("cpu")),
              "model": "smollm2-135m shape, random fp32",
              "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/ttft_room.py " + " ".join(
                  f"--{k} {v}" for k, v in (("lengths", args.lengths), ("rooms", args.rooms),
                                            ("schedules", args.schedules), ("repeats", args.repeats))),
              "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, rooms, args.out.with_suffix(".png"))


def plot(rows: list[dict], rooms: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["prompt"], r["schedule"]) for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (2 * len(rooms))
    for i, room in enumerate(rooms):
        for j, key in enumerate(("ttft_s_median", "first_token_wall_s_median")):
            values = [next(r[key] for r in rows if (r["prompt"], r["schedule"], r["room"]) == (*c, room)) * 1e3
                      for c in cases]
            x = [k + (2 * i + j - len(rooms) + 0.5) * width for k in range(len(cases))]
            ax.bar(x, values, width, label=f"room {room}: {'ttft_s' if j == 0 else 'call to first token'}")
    ax.set_xticks(range(len(cases)), [f"{n} tokens, {s}" for n, s in cases])
    ax.set_ylabel("ms (median)")
    ax.set_title("First token with room for few or many new tokens (CPU, SmolLM2-135M shape)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
