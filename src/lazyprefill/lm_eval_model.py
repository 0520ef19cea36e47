"""The `lazyprefill` model of lm-evaluation-harness: any lm-eval task, run through LazyLLM.

`LazyPrefillLM` is lm-eval's own Hugging Face model (`HFLM`: loading, tokenization, truncation, batching, chat
templates, the logits cache of multiple-choice tasks) with the two places that run the model routed through
`LazyLLM`:
- `generate_until`: `_model_generate` generates with `LazyLLM.generate` (pruned prefill, LazyLLM decoding) and
  stops at the task's `until` strings and `max_gen_toks`, greedy or sampled;
- `loglikelihood` (and `loglikelihood_rolling`, which calls it per window): `_loglikelihood_tokens` prefills the
  context with LazyLLM, then feeds the continuation's tokens one decoding step each (teacher forcing); a step's
  logits give the next continuation token's log-probability. This is exactly what a generation under the schedule
  computes for those tokens: the context is pruned, and past a pruning layer each step attends only to the rows
  the schedule selects (kept or revived). A rolling window's context is one token (lm-eval's windows are
  disjoint), so perplexity measures that decoding-time selection, not prefill pruning.

lm-eval finds models in its own registry only, and its CLI imports no outside code (lm_eval 0.4.13): importing this
module registers `lazyprefill`, and `lazyprefill lm-eval ARGS` runs lm-eval's own command line after that import.
Nothing else in lazyprefill imports this module, so lm-eval is needed only by those who use it
(`pip install 'lazyprefill[lm-eval]'`).

Shapes: B requests in a batch, A of them still taking continuation tokens, V the vocabulary.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm

from .generation import LazyLLM
from .schedule import DEFAULT_PRESET, split_list

# lm-eval's generation kwargs that LazyLLM honours (`until` and `max_gen_toks` are taken out before they get here)
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")

# (the strings lm-eval caches the answer under, or None; context ids; continuation ids)
LoglikelihoodRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("lazyprefill")
class LazyPrefillLM(HFLM):
    """lm-eval's HFLM whose generation and log-likelihoods run through LazyLLM under `schedule`.

    `schedule` is anything `LazyLLM` takes ("balanced", the default; "paper", "dense", layer:ratio pairs, a schedule
    file). lm-eval splits model_args at commas, so separate layer:ratio pairs with ';' ("9:0.7;19:0.7"), as
    `lazyprefill eval --schedules` does. Every other argument is HFLM's (pretrained, dtype, device, batch_size, ...).
    """

    def __init__(self, pretrained, schedule: str | None = DEFAULT_PRESET, **kwargs) -> None:
        # lm-eval's "k=v,k=v" parsing turns the pairs of schedule=9:0.7,19:0.7 into keys such as "19:0.7"
        stray = [key for key in kwargs if not key.isidentifier()]
        if stray:
            raise ValueError(
                f"model_args has {', '.join(map(repr, stray))}, which is not key=value: separate a schedule's "
                "layer:ratio pairs with ';' (schedule=9:0.7;19:0.7)"
            )
        if str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise ValueError("batch_size=auto sizes batches for dense HF forward passes: give lazyprefill an int")
        if kwargs.get("mixed_precision_dtype") is not None:
            raise ValueError("mixed_precision_dtype is not applied by LazyLLM: load the model in a dtype instead")
        super().__init__(pretrained, **kwargs)
        text = ",".join(split_list(schedule)) if isinstance(schedule, str) else schedule
        try:
            self.lazy = LazyLLM(self.model, schedule=text, tokenizer=self.tokenizer)
        except (ValueError, TypeError) as err:
            raise ValueError(f"lazyprefill cannot run this model with schedule={schedule!r}: {err}") from err

    def get_model_info(self) -> dict:
        """HFLM's, plus the schedule as `parse_schedule` reads it back, so that results say how they were pruned."""
        return {**super().get_model_info(), "lazyprefill_schedule": self.lazy.schedule.describe()}

    # ------------------------------------------------------------ generate_until
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs
                        ) -> torch.Tensor:
        """HFLM's generation call, made by LazyLLM: context [B, n] left-padded (its `attention_mask` among the
        kwargs) -> [B, n + new] ids, each answer padded on the right with the pad token, as `model.generate` does."""
        mask = generation_kwargs.pop("attention_mask", None)
        unknown = sorted(set(generation_kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"generation kwargs {unknown} are not supported by lazyprefill: use {SAMPLING_KWARGS}")
        sampling = {}  # greedy: temperature, top_k and top_p do not apply
        if generation_kwargs.get("do_sample"):
            # seeded from torch's RNG, which lm-eval seeds (--seed): sampled answers are reproducible
            sampling = {**generation_kwargs, "seed": int(torch.randint(2**31, ()))}
        outputs = self.lazy.generate(context, max_length - context.shape[1], attention_mask=mask,
                                     stop_strings=stop or None, **sampling)
        width = max(len(out.new_tokens) for out in outputs)
        pad = self.tokenizer.pad_token_id
        new = [out.new_tokens + [pad] * (width - len(out.new_tokens)) for out in outputs]
        return torch.cat([context, torch.tensor(new, dtype=context.dtype, device=context.device)], dim=1)

    # ------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(self, requests: list[LoglikelihoodRequest], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log-probability of each continuation given its context, whether greedy decoding picks it), in order.

        As HFLM: longest first, a context and continuation longer than max_length + 1 lose tokens on the left, and
        requests that share context + continuation[:-1] (the answers of a multiple-choice question) are computed
        once (lm-eval's logits cache). lm-eval groups them by those tokens alone, so a group member whose context
        ends where another's continuation begins is scored on its representative's prefill.
        """
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts" if self.logits_cache else None, group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in order.get_batched(n=override_bs or self.batch_size):
            tokens = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
            conts = [continuation for _, _, continuation in chunk]
            prompts = [t[: len(t) - len(c)] for t, c in zip(tokens, conts)]
            for (strings, context, continuation), logprobs in zip(chunk, self._teacher_forced(prompts, conts)):
                for key, cont, lp in order.get_cache(req_str=strings, cxt_toks=context, cont_toks=continuation,
                                                     logits=logprobs[None]):
                    lp = lp[0, -len(cont):]  # [len(cont), V]: a member's continuation may be shorter
                    target = torch.tensor(cont, device=lp.device)
                    answer = (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                    results.append(answer)
                    if key is not None:  # None: a window of loglikelihood_rolling, cached per document there
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                    bar.update(1)
        bar.close()
        return order.get_original(results)

    def _teacher_forced(self, prompts: list[list[int]], conts: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities [len(cont), V] over each continuation: LazyLLM prefills the prompts, then each
        continuation token but the last is fed as a decoding step (teacher forcing), as if it had been generated."""
        device = self.lazy.adapter.device
        rows: list[list[torch.Tensor]] = [[] for _ in prompts]
        capacity = max(len(p) + len(c) - 1 for p, c in zip(prompts, conts))
        # the LazyLLM's own kept engine: its cache, compiled code and CUDA graphs serve every batch of this size
        engine = self.lazy.engine_for(len(prompts), capacity)
        with torch.inference_mode():
            logits, _ = engine.prefill([torch.tensor(p, device=device) for p in prompts])  # [B, V]
            engine.settle()
            active = list(range(len(prompts)))
            for step in range(max(map(len, conts))):
                # log_softmax copies: a step's logits may live in a CUDA graph's buffer, rewritten by the next step
                for i, row in zip(active, F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)):
                    rows[i].append(row)
                active = [i for i in active if len(conts[i]) > step + 1]
                if not active:
                    break
                fed = torch.tensor([conts[i][step] for i in active], device=device)  # [A]
                logits, _ = engine.step(fed, active)  # [A, V]
        return [torch.stack(r) for r in rows]


def main(argv: list[str]) -> None:
    """lm-eval's own command line (`lm_eval ARGS`) with the `lazyprefill` model registered by this import."""
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
