"""Accuracy of a continued (reused) prefill against a fresh one, on the eval's tasks (issue 25).

Each sample's prompt is split into a document (all but its last `--question-tokens` tokens) and a question (the
rest). A session prefills the document once under the schedule and first answers `--questions` - 1 other samples'
questions (so the document's Aux Cache and revivals are those real earlier questions left), then this sample's: the
score of that last answer is set beside the fresh prefill of the whole prompt under the same schedule, and beside
dense. The scores, paired differences, each prefill's work (its share of dense's (token, layer) rows: the fresh
prompt's, and the document's in the session) and the held tokens each question resumed go to JSON and a markdown
table, rewritten after every sample (a run stopped by a lease's end keeps what it measured; the tasks take turns,
so it has samples of each).

    PYTHONPATH=src python3 benchmarks/reuse_accuracy.py --model smollm2 --tasks passkey,recall,code --length 512 \\
        --samples 30 --questions 2 --schedules balanced,paper --out results/smollm2-cpu-512-reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import lazyprefill as lp
from lazyprefill.eval import metrics, tasks
from lazyprefill.eval.runner import task_score
from lazyprefill.flops import prefill_work
from lazyprefill.models import load_model
from lazyprefill.schedule import split_list


def answer(out: lp.GenerationOutput, sample: tasks.Sample, dense: list[int]) -> float:
    return task_score(sample, out.text, out.new_tokens, dense)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="passkey,recall,code")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--question-tokens", type=int, default=24)
    p.add_argument("--questions", type=int, default=2, help="questions per document, the scored one last")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--schedules", default="balanced", help="comma-separated specs (';' joins layer:ratio pairs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.questions < 1:
        p.error(f"--questions={args.questions} must be at least 1 (the scored question)")
    if args.samples < args.questions:
        p.error(f"--samples={args.samples} < --questions={args.questions}: the earlier questions are other samples'")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    schedules = split_list(args.schedules)
    dense = lp.LazyLLM(model, None, tokenizer=tok)
    lazies = {s: lp.LazyLLM(model, f"{s}+min=0", tokenizer=tok) for s in schedules}
    samples = tasks.build_all(args.tasks.split(","), tok, [args.length], args.samples, seed=0)  # tasks take turns
    k, records = args.question_tokens, []
    for sample in tqdm(samples, desc="reuse accuracy"):
        ids = torch.tensor(sample.prompt_ids)
        same = [s for s in samples if s.task == sample.task]
        i = same.index(sample)
        others = [same[(i + j) % len(same)] for j in range(1, args.questions)]  # earlier requests' questions
        opts = {"max_new_tokens": sample.max_new_tokens, "eos_token_id": [],
                "stop_strings": ["\n"] if sample.task == "code" else None}
        ref = dense.generate(ids, **opts)
        row = {"task": sample.task, "index": sample.index, "dense": answer(ref, sample, ref.new_tokens), "work": {},
               "revived": {}}
        for name, lazy in lazies.items():
            fresh = lazy.generate(ids, **opts)
            row[f"{name} fresh"] = answer(fresh, sample, ref.new_tokens)
            session = lazy.session(ids[:-k], room=k + sample.max_new_tokens + 1)
            # each prefill's work, so that a run whose every score is dense's can be seen to have pruned
            row["work"][name] = {"fresh": fresh.stats.prefill_work,
                                 "document": prefill_work(session.prefill_computed, len(ids) - k)}
            # the held tokens each question resumed (a revival bound caps them), the scored question last
            asked = [session.generate(torch.tensor(other.prompt_ids[-k:]), **opts) for other in others]
            asked.append(session.generate(ids[-k:], **opts))
            row["revived"][name] = [sum(out.stats.steps[0].revived) for out in asked]
            row[f"{name} reused"] = answer(asked[-1], sample, ref.new_tokens)
        records.append(row)
        write_report(records, args.out)
    print((args.out / "reuse.md").read_text())


def write_report(records: list[dict], out: Path) -> None:
    methods = [m for m in records[0] if m not in ("task", "index", "work", "revived")]
    table: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        table[task] = {}
        for m in methods:
            base = m.replace(" reused", " fresh") if m.endswith(" reused") else "dense"
            name, _, kind = m.rpartition(" ")  # "<schedule> fresh" or "<schedule> reused"; dense computes every row
            part = "fresh" if kind == "fresh" else "document"
            table[task][m] = {
                "prefill_work": statistics.fmean(r["work"][name][part] for r in rows) if name else 1.0,
                "score": metrics.mean_ci([r[m] for r in rows]).to_dict(),
                "diff_vs_dense": metrics.paired_diff_ci([r[m] for r in rows], [r["dense"] for r in rows]).to_dict(),
                "diff_vs_fresh": metrics.paired_diff_ci([r[m] for r in rows], [r[base] for r in rows]).to_dict(),
            }
    out.mkdir(parents=True, exist_ok=True)
    (out / "reuse.json").write_text(json.dumps({"command": " ".join(sys.argv), "summary": table,
                                                "records": records}, indent=1))
    lines = ["| task | method | prefill work | score | n | diff vs dense [95% CI] | reused vs fresh [95% CI] |",
             "|---|---|---:|---:|---:|---|---|"]
    for task, by in table.items():
        for m, s in by.items():
            d, f = s["diff_vs_dense"], s["diff_vs_fresh"]
            vs_fresh = f"{f['mean']:+.3f} [{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]" if m.endswith(" reused") else ""
            lines.append(f"| {task} | {m} | {s['prefill_work']:.2f} | {s['score']['mean']:.3f} | {s['score']['n']} | "
                         f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {vs_fresh} |")
    (out / "reuse.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
