"""The scheduler on the GPU's decoding layout, run eagerly on the CPU: does a failure under load come from the
layout or from the device? (benchmarks/NOTES.md, "Eighth GPU session": `balanced` failed steps on an H100.)

On CUDA a decoding step runs every slot with rows laid out in buckets and the revival bound laid out in full, so
that it can be captured as a graph; on the CPU it runs only the busy slots at their exact rows.
DecodeOptions(graph_layout=True) gives the CPU the GPU's layout, run eagerly. Staggered requests of random lengths
go through a four-slot scheduler; each must finish with the tokens the same request gets alone.

    PYTHONPATH=src:tests python benchmarks/serve_layout_cpu.py --schedule balanced --longest 30000 --requests 12
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import transformers as tf
from helpers import LLAMA3_ROPE, prompt_ids, random_tiny, word_tokenizer

import lazyprefill as lp
from lazyprefill.engine import DecodeOptions
from lazyprefill.generation import SamplingParams
from lazyprefill.serving import Event, Scheduler, ServeConfig, ServeRequest


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if event.finish_reason is not None:
            self.done.set()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="balanced")
    p.add_argument("--longest", type=int, default=230, help="prompts of longest/3 to longest tokens")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="compiled decoding, as on CUDA")
    args = p.parse_args()
    model = random_tiny(tf.LlamaConfig, tf.LlamaForCausalLM,
                        {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": args.longest + 64}, num_layers=8)
    decode = DecodeOptions(compile=args.compile, graph_layout=True)
    config = ServeConfig(schedule=args.schedule, max_batch=4, max_prompt_tokens=args.longest, max_new_tokens=16,
                         prefill_chunk=256)
    scheduler = Scheduler(model, word_tokenizer(), config, decode=decode, eos=set())
    rng, sent = random.Random(0), []
    for i in range(args.requests):
        n, out = rng.randint(args.longest // 3, args.longest), Collector()
        sent.append((n, out))
        scheduler.submit(ServeRequest(prompt_ids(n, seed=i).tolist(), 16, SamplingParams(), "", (), out))
        time.sleep(rng.random())
    for _, out in sent:
        out.done.wait(3600)
    scheduler.close()
    alone = lp.LazyLLM(model, args.schedule, decode=decode)
    failed = sum(out.events[-1].finish_reason != "length" for _, out in sent)
    differ = sum([e.token for e in out.events if e.token is not None]
                 != alone.generate(prompt_ids(n, seed=i), max_new_tokens=16, eos_token_id=[]).new_tokens
                 for i, (n, out) in enumerate(sent))
    print(f"{args.schedule}, {args.requests} requests of {args.longest // 3}-{args.longest} tokens: "
          f"{failed} failed, {differ} differ from the request alone")


if __name__ == "__main__":
    main()
