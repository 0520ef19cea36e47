"""Load on an OpenAI-compatible server: Poisson arrivals of long-document requests, streamed, timed by the client.

Per run: TTFT p50/p99 (request sent -> first text), per-token p50/p99 (between streamed tokens), throughput (tokens
of finished requests / wall time), errors, and the server's memory (resident, and GPU if any) after warm-up and at
the end. The same seeded arrival trace (times, documents, lengths) goes to every server, so runs compare at the same
load. Servers: `lazyprefill serve` started here (one per --schedules entry), or any running one by --url (for
example `transformers serve`). Documents are windows of real text nobody in this project wrote: the CPython
standard library's sources installed with this Python. Writes JSON, a markdown table and a plot.

  PYTHONPATH=src python benchmarks/serve_load.py --model smollm2 --schedules balanced,dense --rate 0.1 \\
      --duration 300 --min-tokens 750 --max-tokens 1500 --new-tokens 32 --out benchmarks/results/serve/cpu
  PYTHONPATH=src python benchmarks/serve_load.py --schedules balanced --rate 0.05 --duration 1800 ...  # a soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

QUESTION = "\n\nWhat does the code above do? Answer in one sentence."


@dataclass
class Outcome:
    """One request as the client saw it."""

    sent: float  # seconds after the run began
    prompt_chars: int
    doc_tokens: int = 0  # the document's tokens (the chat template and the question add a few dozen)
    status: int = 0  # HTTP status, 0: no answer
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between streamed text chunks
    tokens: int = 0
    total_s: float | None = None
    server: dict = field(default_factory=dict)  # the server's `lazyprefill` figures, if it sends them
    finish: str = ""  # the stream's finish_reason: "length" or "stop" for an answer the server finished
    error: str = ""


def stdlib_text(limit: int = 2_000_000) -> str:
    """Python sources from the standard library, in a fixed order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size > limit:
            break
    return "\n".join(parts)


def trace(rate: float, duration: float, seed: int, min_tokens: int, max_tokens: int,
          tokenizer) -> list[tuple[float, str, int]]:
    """(arrival second, document, its tokens) triples: Poisson arrivals at `rate` per second over `duration` seconds,
    each document a window of the standard library of a uniformly drawn length in `tokenizer`'s tokens. Lengths are
    drawn in tokens, not characters, because Python source runs from 0.2 to 0.45 tokens a character: windows of
    19K-76K characters, taken for 8K-33K tokens, held 5K-20K of SmolLM2's (benchmarks/NOTES.md, "Eleventh GPU
    session")."""
    rng, text, t, out = random.Random(seed), stdlib_text(), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        n = rng.randint(min_tokens, max_tokens)
        start, chars = rng.randrange(0, len(text) // 2), 6 * n
        while True:  # a window of characters that holds n tokens, cut after the nth
            window = text[start : start + chars]
            ends = [end for _, end in tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)
                    ["offset_mapping"]]
            if len(ends) >= n:
                break
            if start + chars >= len(text):
                raise ValueError(f"the standard library's text from {start} holds {len(ends)} tokens, not {n}")
            chars *= 2
        out.append((t, window[: ends[n - 1]] + QUESTION, n))


async def one(client: httpx.AsyncClient, url: str, model: str, doc: str, new: int, begun: float,
              outcome: Outcome) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": doc}], "max_tokens": new, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    outcome.sent = start - begun
    last = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            outcome.status = reply.status_code
            if reply.status_code != 200:
                outcome.error = (await reply.aread()).decode()[:200]
                return
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a server that fails a request mid-stream says so in the stream
                    outcome.error = json.dumps(chunk["error"])[:300]
                    continue
                outcome.server = chunk.get("lazyprefill", outcome.server)
                if chunk.get("choices") and chunk["choices"][0].get("finish_reason"):
                    outcome.finish = chunk["choices"][0]["finish_reason"]
                if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                    continue
                now = time.perf_counter()
                if last is None:
                    outcome.ttft_s = now - start
                else:
                    outcome.gaps_s.append(now - last)
                last = now
                outcome.tokens += 1
        outcome.total_s = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        outcome.error = f"{type(err).__name__}: {err}"[:200]


async def drive(url: str, model: str, arrivals: list[tuple[float, str, int]], new: int
                ) -> tuple[list[Outcome], float]:
    outcomes = [Outcome(t, len(doc), n) for t, doc, n in arrivals]
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        begun = time.perf_counter()
        tasks = []
        with tqdm(total=len(arrivals), desc=url) as bar:
            for (t, doc, _), outcome in zip(arrivals, outcomes):
                await asyncio.sleep(max(0.0, t - (time.perf_counter() - begun)))
                task = asyncio.create_task(one(client, url, model, doc, new, begun, outcome))
                task.add_done_callback(lambda _t: bar.update(1))
                tasks.append(task)
            await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - begun


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200 and not o.error and o.finish in ("length", "stop")]
    ttft = [o.ttft_s for o in ok]
    gaps = [g for o in ok for g in o.gaps_s]
    server_ttft = [o.server["ttft_s"] for o in ok if o.server.get("ttft_s") is not None]
    return {
        "requests": len(outcomes), "finished": len(ok), "errors": len(outcomes) - len(ok),
        "statuses": {str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status for o in outcomes})},
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "per_token_p50_s": percentile(gaps, 50), "per_token_p99_s": percentile(gaps, 99),
        "server_ttft_p50_s": percentile(server_ttft, 50),
        "tokens_per_s": sum(o.tokens for o in ok) / wall, "wall_s": wall,
        "prefill_work_mean": statistics.fmean(o.server["prefill_work"] for o in ok) if ok and all(
            o.server.get("prefill_work") is not None for o in ok) else None,
    }


def memory(pid: int | None) -> dict:
    """Resident memory of the server process (MB), and GPU memory in use (MB) if nvidia-smi answers."""
    out: dict = {}
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
    try:
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10)
        if used.returncode == 0:
            out["gpu_mb"] = float(used.stdout.split()[0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        pass
    return out


def start_server(args: argparse.Namespace, schedule: str, log: Path) -> tuple[subprocess.Popen, str]:
    """A `lazyprefill serve` whose output goes to `log`: read where a request failed, and never a full pipe that
    would stall the server."""
    port = 8300 + random.randrange(600)
    cmd = [sys.executable, "-m", "lazyprefill", "serve", "--model", args.model, "--port", str(port), "--schedule",
           schedule, "--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
           "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-new-tokens", str(args.new_tokens),
           *args.server_arg]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start in 10 minutes")


def run_one(args: argparse.Namespace, name: str, arrivals: list, url: str | None, schedule: str | None) -> dict:
    proc = None
    if url is None:
        proc, url = start_server(args, schedule, args.out.with_name(f"{args.out.name}-server-{name}.log"))
    try:
        # warm-up: the largest documents, one then two at once, so that the memory after it is the working set's
        warm = [(0.0, doc, n) for _, doc, n in trace(1.0, 10.0, args.seed + 1, args.max_tokens, args.max_tokens,
                                                       args.tokenizer_loaded)[:3]]
        warmup = asyncio.run(drive(url, args.model_name, warm[:1], args.new_tokens))[0]
        warmup += asyncio.run(drive(url, args.model_name, warm[1:], args.new_tokens))[0]
        time.sleep(2)  # the server idles: what it holds then is its working set
        before = memory(proc.pid if proc else None)
        samples: list[dict] = []
        sampling = threading.Event()

        def sample() -> None:  # memory every 5 s during the run, with its second into the run
            begun = time.perf_counter()
            while not sampling.wait(5):
                samples.append({"s": round(time.perf_counter() - begun, 1), **memory(proc.pid if proc else None)})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcomes, wall = asyncio.run(drive(url, args.model_name, arrivals, args.new_tokens))
        sampling.set()
        sampler.join()
        time.sleep(2)
        after = memory(proc.pid if proc else None)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    peak = {k: max(m.get(k, 0) for m in samples) for k in before} if samples else {}
    return {"name": name, "url": url if proc is None else "started here", "schedule": schedule,
            "memory_after_warmup": before, "memory_at_end": after, "memory_peak_during_run": peak,
            "memory_samples": samples,
            **summary(outcomes, wall), "outcomes": [asdict(o) for o in outcomes],
            "warmup_outcomes": [asdict(o) for o in warmup]}


def paired_speedup(run: dict, base: dict) -> float | None:
    """The median over requests of base's TTFT / run's: the same trace, request by request, so that a p50 ratio's
    mix of lengths does not speak for it."""
    ratios = [b["ttft_s"] / o["ttft_s"] for o, b in zip(run["outcomes"], base["outcomes"], strict=True)
              if o["ttft_s"] and b["ttft_s"]]
    return statistics.median(ratios) if ratios else None


def markdown(result: dict) -> str:
    cfg = result["config"]
    base = next((r for r in result["runs"] if r["name"] == "dense"), None)
    lines = [f"Load: Poisson arrivals at {cfg['rate']} requests/s for {cfg['duration']} s, documents of "
             f"{cfg['min_tokens']}-{cfg['max_tokens']} tokens of CPython's standard library plus a question, "
             f"{cfg['new_tokens']} new tokens (greedy), streamed; model {cfg['model']} on {cfg['device']}; "
             f"command: `{result['command']}`.", "",
             "| server | finished / sent | errors | TTFT p50 s | TTFT p99 s | TTFT vs dense, paired | "
             "per-token p50 ms | per-token p99 ms | tokens/s | prefill work | "
             "resident / GPU MB: idle after warm-up -> idle at end (peak while loaded) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def f(x, spec, scale=1.0):
        return "—" if x is None else format(x * scale, spec)

    for r in result["runs"]:
        mem = " / ".join(
            f"{r['memory_after_warmup'][k]:.0f} -> {r['memory_at_end'].get(k, 0):.0f} "
            f"({r.get('memory_peak_during_run', {}).get(k, 0):.0f})" for k in ("rss_mb", "gpu_mb")
            if k in r["memory_after_warmup"]) or "—"
        paired = paired_speedup(r, base) if base is not None and r is not base else None
        paired_x = "—" if paired is None else f"{paired:.2f}x"
        lines.append(f"| {r['name']} | {r['finished']} / {r['requests']} | {r['errors']} | "
                     f"{f(r['ttft_p50_s'], '.2f')} | {f(r['ttft_p99_s'], '.2f')} | {paired_x} | "
                     f"{f(r['per_token_p50_s'], '.0f', 1e3)} | {f(r['per_token_p99_s'], '.0f', 1e3)} | "
                     f"{f(r['tokens_per_s'], '.2f')} | "
                     f"{f(r['prefill_work_mean'], '.2f')} | {mem} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_length, over_time, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for i, r in enumerate(result["runs"]):
        ok = [o for o in r["outcomes"] if o["ttft_s"] is not None]
        by_length.scatter([o["doc_tokens"] for o in ok], [o["ttft_s"] for o in ok], s=12, color=f"C{i}",
                          label=r["name"])
        over_time.scatter([o["sent"] for o in ok], [o["ttft_s"] for o in ok], s=12, color=f"C{i}", label=r["name"])
        gaps = sorted(g * 1e3 for o in ok for g in o["gaps_s"])
        right.plot(gaps, [j / max(len(gaps) - 1, 1) for j in range(len(gaps))], color=f"C{i}", label=r["name"])
    by_length.set_xlabel("document tokens")
    by_length.set_title("time to first token, by length")
    over_time.set_xlabel("request sent (s into the run)")
    over_time.set_title("time to first token, over the run")
    for ax in (by_length, over_time):
        ax.set_ylabel("TTFT (s)")
    right.set_xlabel("ms between streamed tokens")
    right.set_ylabel("share of gaps")
    right.set_xscale("log")
    right.set_title("per-token latency (CDF)")
    for ax in (by_length, over_time, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="for servers started here (lazyprefill serve --model)")
    p.add_argument("--model-name", help="the `model` field sent (default: --model)")
    p.add_argument("--schedules", default="balanced,dense", help="a lazyprefill server per schedule, started here")
    p.add_argument("--url", action="append", default=[], help="NAME=URL of a running server to load as well")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="passed on to every lazyprefill serve started here, e.g. --server-arg=--decode=graphs=off")
    p.add_argument("--rate", type=float, default=0.1, help="arrivals per second")
    p.add_argument("--duration", type=float, default=300, help="seconds of arrivals")
    p.add_argument("--min-tokens", type=int, default=1000, help="the shortest document, in the tokenizer's tokens")
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--tokenizer", help="whose tokens measure documents (default: --model)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve/load"))
    args = p.parse_args()
    if not 0 < args.min_tokens <= args.max_tokens:
        p.error(f"--min-tokens={args.min_tokens} and --max-tokens={args.max_tokens}: need 0 < min <= max")
    args.model_name = args.model_name or args.model
    args.tokenizer = args.tokenizer or args.model
    result = {"kind": "serve_load", "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    import torch

    from lazyprefill.env import machine_info
    from lazyprefill.models import load_tokenizer

    args.tokenizer_loaded = load_tokenizer(args.tokenizer)
    arrivals = trace(args.rate, args.duration, args.seed, args.min_tokens, args.max_tokens, args.tokenizer_loaded)

    result["machine"] = machine_info(torch.device(args.device))
    targets = [(s, None, s) for s in args.schedules.split(",") if s] + [
        (u.split("=", 1)[0], u.split("=", 1)[1], None) for u in args.url]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, url, schedule in targets:
        result["runs"].append(run_one(args, name, arrivals, url, schedule))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(markdown(result))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
