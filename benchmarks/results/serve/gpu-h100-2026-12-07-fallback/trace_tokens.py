"""The eleventh GPU session's load trace, drawn in characters as serve_load.py then drew it (rate 0.3, 90 s, seed 0,
19,000-76,000 characters), measured in SmolLM2's tokens on this machine's Python library; and the per-request TTFT
ratio of dense to `balanced` by document size, from load.json.

    PYTHONPATH=src python benchmarks/results/serve/gpu-h100-2026-12-07-fallback/trace_tokens.py \\
        benchmarks/results/serve/gpu-h100-2026-12-07-fallback/load.json  # .gpu/tok: lent_gpu.sh prepare
"""

import importlib.util
import json
import random
import statistics
import sys

from lazyprefill.models import load_tokenizer

spec = importlib.util.spec_from_file_location("serve_load", "benchmarks/serve_load.py")
serve_load = sys.modules["serve_load"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)
tok = load_tokenizer(".gpu/tok")
rng, text, t, sizes = random.Random(0), serve_load.stdlib_text(), 0.0, []
while True:
    t += rng.expovariate(0.3)
    if t > 90:
        break
    size = rng.randint(19000, 76000)
    start = rng.randrange(0, len(text) - size)
    sizes.append((size, len(tok(text[start : start + size], add_special_tokens=False).input_ids)))
pruned, dense = (r["outcomes"] for r in json.load(open(sys.argv[1]))["runs"])
per_char = [n / c for c, n in sizes]
print(f"Python {sys.version.split()[0]}: {len(sizes)} documents, {min(per_char):.3f}-{max(per_char):.3f} tokens a "
      f"character, {min(n for _, n in sizes)}-{max(n for _, n in sizes)} tokens")
print("sizes as in load.json (document + question):",
      [c + len(serve_load.QUESTION) for c, _ in sizes] == [o["prompt_chars"] for o in pruned])
for lo, hi in ((0, 40000), (40000, 60000), (60000, 10**9)):
    ratios = [d["ttft_s"] / p["ttft_s"] for p, d in zip(pruned, dense) if lo <= p["prompt_chars"] < hi]
    print(f"{lo}-{hi} characters: {len(ratios)} requests, median dense / balanced TTFT {statistics.median(ratios):.3f}")
print(f"all: median {statistics.median(d['ttft_s'] / p['ttft_s'] for p, d in zip(pruned, dense)):.3f}")
