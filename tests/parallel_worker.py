"""One rank of the tensor-parallel tests (test_parallel.py), started by torchrun: `parallel_worker.py CASE OUT`.

- `generate`: every (family, schedule) of CASES (CASES_TP4 on 4 ranks) on tiny models split over the job's ranks
  (parallel.shard); each rank saves its tokens, logits and selections to OUT/rank{r}.pt for the test to compare
  with one process. Then every rank but rank 0 perturbs its scores after the all-reduce, so that its selections
  differ, and saves the error the engine raised (under "diverged").
- `fail`: rank 1 raises in the middle of a prefill; the others must not hang.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import tiny_model

import lazyprefill as lp
from lazyprefill import parallel

NUM_LAYERS = {"gemma3": 6}  # its config names 6 layer types; the others have 4
NEW_TOKENS = 6
# (family, schedule): dense; one pruning layer, whose `last` scorer revives in decoding; a bounded revival; Gemma 3's
# sliding layers (it prunes at a full-attention layer); a max over heads
CASES = [
    ("llama_gqa_rope3", "dense"),
    ("llama_gqa_rope3", "1:0.5"),
    ("llama_gqa_rope3", "revive(rows=2, of=last):1:0.5,2:0.5"),
    ("qwen2", "1:0.5"),
    ("qwen3", "last(heads=max):1:0.5"),
    ("gemma3", "2:0.5"),
]
CASES_TP4 = [("llama_mha", "dense"), ("llama_mha", "1:0.5")]  # 4 K/V heads: one a rank
TIMEOUT = timedelta(seconds=20)  # a rank that hangs alive fails the others' collectives after this


def prompts(seed: int = 0) -> list[torch.Tensor]:
    """Two prompts of different lengths, the same on every rank and in the test's own process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g) for n in (40, 29)]


def run(family: str, schedule: str, model: torch.nn.Module) -> list[dict]:
    """Greedy answers of both prompts as one batch, EOS off: what the test compares across ranks."""
    outs = lp.LazyLLM(model, schedule).generate(prompts(), max_new_tokens=NEW_TOKENS, return_logits=True,
                                                eos_token_id=[])
    return [{"tokens": o.new_tokens, "logits": torch.stack(o.logits), "prefill_depth": o.stats.prefill_depth,
             "final_depth": o.stats.final_depth, "revived": o.stats.revived} for o in outs]


def diverged(model: torch.nn.Module, rank: int) -> str | None:
    """The error a generation raises when every rank but rank 0 adds noise to its scores (None: none raised)."""
    lazy = lp.LazyLLM(model, "1:0.5")
    reduce = lazy.adapter.reduce_heads
    noise = torch.Generator().manual_seed(rank)
    lazy.adapter.reduce_heads = lambda p, heads: reduce(p, heads) + rank * torch.rand(p.shape[-1], generator=noise)
    try:
        lazy.generate(prompts()[0], max_new_tokens=2)
    except parallel.RanksDiverged as err:
        return str(err)
    return None


def main(case: str, out: Path) -> None:
    rank = parallel.init(TIMEOUT)
    cases = CASES if dist.get_world_size() == 2 else CASES_TP4
    families = {family for family, _ in cases}
    models = {f: parallel.shard(tiny_model(f, NUM_LAYERS.get(f, 4)), timeout=TIMEOUT) for f in sorted(families)}
    first = models[cases[0][0]]
    if case == "generate":
        result = {f"{family} {schedule}": run(family, schedule, models[family]) for family, schedule in cases}
        result["diverged"] = diverged(first, rank)
    elif case == "fail":
        lazy = lp.LazyLLM(first, "1:0.5")
        finish = lazy.adapter.finish

        def failing(layer: int, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
            if rank == 1 and layer == 2:
                raise RuntimeError("injected failure on rank 1 in layer 2 of the prefill")
            return finish(layer, h, o)

        lazy.adapter.finish = failing
        lazy.generate(prompts()[0], max_new_tokens=2)
        result = {}
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
