"""Correctness on the GPU before timing: lazyprefill's dense path against transformers on a small Llama 3.

Prints the max abs and relative error of the logits at prefill and at each greedy decoding step, in fp32
and in bf16, and whether the greedy tokens agree. Then runs a pruning schedule with revival against the
float64 reference of tests/reference.py on the GPU (the decoding paths that only run there: flash
attention, written-out masked attention), and a batch of prompts of different lengths against each
prompt alone. Then the decoding fast path (CUDA graphs of static-shape segments) against the same engine
run eagerly, on bf16 `llama2-7b` shapes after an 8K prompt: same greedy tokens over 64 steps, logits within
bf16 rounding; and each faster variant (split kernel, burst kernel, compiled layers) no further
from an fp32 copy of the model than the path it replaces. Then the sliding-window family (Gemma 3 270M's
shape, fp32): dense against transformers, `paper` under graphs against eager (`check_gpu.py windowed` runs only this).
Then block-sparse prefill attention (sparse.py) against SDPA over the same keys (`check_gpu.py sparse` runs only this).
A dense session's follow-up question (Engine.extend) is checked against a fresh prefill of the whole, fp32 and bf16
(`check_gpu.py continuation` runs only this).
Exits non-zero if fp32 differs by more than 1e-3, the graphs differ from eager or a variant is less
accurate than what it replaces.
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import lazyprefill as lp
from lazyprefill import bench
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import DecodeOptions, Engine

SMALL = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
)


# Pruned however short the prompt (on CUDA a schedule runs prompts under 2K tokens dense by default)
PRUNED = "1:0.5,2:0.5+min=0"


def small_model(seed: int, dtype: torch.dtype, **overrides) -> tuple[LlamaForCausalLM, LlamaConfig]:
    torch.manual_seed(seed)
    config = LlamaConfig(**SMALL, **overrides)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to("cuda", dtype).eval(), config


def gemma_model(seed: int) -> Gemma3ForCausalLM:
    """Gemma 3 270M's shape with random weights (vocab cut to 32K): 15 layers sliding over 512 positions,
    full attention at 5, 11 and 17, head size 256, one K/V head."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=32000, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    return Gemma3ForCausalLM(config).to("cuda", torch.float32).eval()


def compare(dtype: torch.dtype, n: int = 2000, steps: int = 8, model: torch.nn.Module | None = None) -> float:
    model = model if model is not None else small_model(0, dtype)[0]
    ids = torch.randint(0, model.config.vocab_size, (n,), device="cuda")
    with torch.inference_mode():
        ref = model.generate(ids[None], max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    out = lp.LazyLLM(model, schedule="dense").generate(ids, max_new_tokens=steps, eos_token_id=[], return_logits=True)
    worst = 0.0
    for step, (mine, theirs) in enumerate(zip(out.logits, ref.logits)):
        theirs = theirs[0].float()
        diff = (mine - theirs).abs().max().item()
        rel = ((mine - theirs).norm() / theirs.norm()).item()
        worst = max(worst, diff)
        print(f"{dtype} step {step}: max abs {diff:.2e} rel {rel:.2e}")
    same = out.new_tokens == ref.sequences[0, n:].tolist()
    print(f"{dtype}: greedy tokens {'agree' if same else 'DIFFER'}")
    paper = lp.LazyLLM(model, schedule="paper+min=0").generate(ids, max_new_tokens=steps, eos_token_id=[],
                                                         return_logits=True)
    finite = all(bool(step.isfinite().all()) for step in paper.logits)
    print(f"{dtype}: paper logits {'finite' if finite else 'NOT FINITE'}, prefill computed per layer "
          f"{paper.stats.prefill_computed}, {paper.stats.revived} rows revived")
    return worst


def compare_continuation(dtype: torch.dtype, n: int = 2000, m: int = 37, steps: int = 4) -> float:
    """A dense session's follow-up (Engine.extend, whose masked attention runs on the memory-efficient kernel on
    CUDA) against a fresh prefill of document + question: the same greedy tokens, logits within rounding."""
    model = small_model(0, dtype)[0]
    ids = torch.randint(0, model.config.vocab_size, (n + m,), device="cuda")
    lazy = lp.LazyLLM(model, schedule="dense")
    fresh = lazy.generate(ids, max_new_tokens=steps, eos_token_id=[], return_logits=True)
    follow = lazy.session(ids[:n], room=m + steps).generate(ids[n:], max_new_tokens=steps, eos_token_id=[],
                                                           return_logits=True)
    worst = max((a - b).abs().max().item() for a, b in zip(follow.logits, fresh.logits))
    same = follow.new_tokens == fresh.new_tokens
    print(f"{dtype} continuation against a fresh prefill: max abs {worst:.2e}, greedy tokens "
          f"{'agree' if same else 'DIFFER'}")
    return worst if same else float("inf")


def compare_reference(n: int = 160, steps: int = 12) -> float:
    sys.path.insert(0, "tests")
    from reference import Reference

    model, config = small_model(1, torch.float32, initializer_range=0.1)  # peaked attention: no near-ties
    ids = torch.randint(0, config.vocab_size, (n,), device="cuda")
    lazy = lp.LazyLLM(model, schedule=PRUNED)
    out = lazy.generate(ids, max_new_tokens=steps + 1, eos_token_id=[], return_logits=True)
    ref = Reference(copy.deepcopy(model).cpu(), lazy.schedule.keep)  # the reference runs on the CPU
    want = [ref.prefill(ids.tolist())] + [ref.decode(t) for t in out.new_tokens[:-1]]
    worst = max((got.cpu().double() - w.double()).abs().max().item() for got, w in zip(out.logits, want, strict=True))
    print(f"fp32 schedule {{1: 0.5, 2: 0.5}} vs float64 reference: max abs {worst:.2e} over {steps + 1} steps, "
          f"{out.stats.revived} rows revived")
    return worst


def compare_batch(lengths: tuple[int, ...] = (700, 64, 1500, 300), steps: int = 12) -> float:
    """Invariant 6 on the GPU: each sequence of a batch gets the logits it gets alone (fp32, `paper`)."""
    model, config = small_model(2, torch.float32, initializer_range=0.1)
    prompts = [torch.randint(0, config.vocab_size, (n,), device="cuda") for n in lengths]
    lazy = lp.LazyLLM(model, schedule=PRUNED)
    kw = dict(max_new_tokens=steps, eos_token_id=[], return_logits=True)
    batch = lazy.generate(prompts, **kw)
    worst, same = 0.0, True
    for got, prompt in zip(batch, prompts, strict=True):
        alone = lazy.generate(prompt, **kw)
        same &= got.new_tokens == alone.new_tokens
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(got.logits, alone.logits, strict=True)))
    print(f"fp32 batch of {len(lengths)} vs alone: max abs {worst:.2e}, tokens {'agree' if same else 'DIFFER'}, "
          f"{sum(o.stats.revived for o in batch)} rows revived")
    return worst if same else float("inf")


def engine(adapter, schedule, capacity: int, **options) -> Engine:
    """An Engine with these DecodeOptions."""
    return Engine(adapter, schedule, capacity, decode=DecodeOptions(**options))


def greedy(engine: Engine, prompt: torch.Tensor, steps: int, fed: list[int] | None = None
           ) -> tuple[list[int], list[torch.Tensor], int]:
    """Prefill + `steps` decoding steps, each fed the previous argmax (or `fed`'s tokens: teacher forcing)
    -> the tokens fed after the prefill, logits per step, rows revived."""
    with torch.inference_mode():
        logits, _ = engine.prefill([prompt])
        engine.settle()
        out, tokens, revived = [logits[0]], [], 0
        for step in range(steps):
            token = logits.argmax(dim=-1) if fed is None else torch.tensor(fed[step : step + 1], device=logits.device)
            tokens.append(int(token))
            logits, stats = engine.decode(token, [0])
            out.append(logits[0])
            revived += sum(stats[0].revived)
    return tokens, out, revived


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative (L2) error of one run's logits against another's, step by step."""
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, want, strict=True))


def compare_graphs(shape: str = "llama2-7b", n: int = 8192, steps: int = 64, fed: int = 8) -> bool:
    """The default decoding path against slower exact ones, bf16 real shapes with random weights, each held to an
    fp32 copy of the model (written-out attention) fed the same tokens.

    CUDA graphs against eager over `steps` steps, eager fed the graphs' greedy tokens: graphs lay out rows in
    buckets and eager at their exact count, so their GEMMs differ in shape and round differently, and with random
    weights (near-uniform logits) a greedy choice can flip; so each is compared with fp32 on the same tokens, and
    graphs must be about as close as eager (error at most 1.25x eager's + 1e-3). Then, fed the first `fed` tokens,
    the default and the default with each choice turned off, by the same rule. Two bf16 paths through 32
    random-weight layers drift apart by a few percent (5.4-5.7e-2 measured between the split kernel and the
    written-out attention); whether that is rounding or a bug only a yardstick in higher precision says.
    """
    model = bench.random_model(shape, "cuda", torch.bfloat16)
    adapter = adapter_for(model)
    fp32 = adapter_for(copy.deepcopy(model).float())
    prompt = bench.random_prompts(n, adapter.vocab_size, 1, torch.device("cuda"), 0)[0]
    capacity, ok = n + steps + 1, True
    for name, schedule in bench.schedules_for(adapter.num_layers).items():
        fast, fast_logits, revived = greedy(engine(adapter, schedule, capacity, graphs=True), prompt, steps)
        _, slow_logits, _ = greedy(engine(adapter, schedule, capacity, graphs=False), prompt, steps, fast)
        plain = {"split_kernel": False, "burst_kernel": False, "compile": False}
        _, yardstick, _ = greedy(engine(fp32, schedule, capacity, **plain), prompt, steps, fast)
        graphs, eager = rel_error(fast_logits, yardstick), rel_error(slow_logits, yardstick)
        good = graphs <= 1.25 * eager + 1e-3
        ok &= good
        print(f"{shape} bf16 {n} {name}: graphs vs eager over {steps} steps fed the same tokens: rel error against "
              f"fp32 graphs {graphs:.2e}, eager {eager:.2e}, between them {rel_error(fast_logits, slow_logits):.2e}, "
              f"{revived} rows revived: {'ok' if good else 'WORSE'}")
        yardstick = yardstick[: fed + 1]
        default = rel_error(fast_logits[: fed + 1], yardstick)
        for off in ("split_kernel", "burst_kernel", "compile"):
            _, logits, _ = greedy(engine(adapter, schedule, capacity, **{off: False}), prompt, fed, fast)
            error = rel_error(logits, yardstick)
            good = default <= 1.25 * error + 1e-3
            ok &= good
            print(f"{shape} bf16 {n} {name}, {fed} tokens fed, rel error against fp32: default {default:.2e}, "
                  f"{off}=False {error:.2e}: {'ok' if good else 'WORSE'}")
    del model, fp32
    torch.cuda.empty_cache()
    return ok


def compare_windowed(n: int = 4096, steps: int = 32) -> bool:
    """The sliding-window family on the GPU (fp32, Gemma 3 270M's shape, windows shorter than the prompt):
    dense against transformers, and `paper` under CUDA graphs against the eager engine."""
    model = gemma_model(3)
    ok = compare(torch.float32, n, 8, model) <= 1e-3
    adapter = adapter_for(model)
    prompt = torch.randint(0, adapter.vocab_size, (n,), device="cuda")
    schedule = lp.LazyLLM(model, schedule="paper").schedule  # moved to the full-attention layers
    fast, fast_logits, revived = greedy(engine(adapter, schedule, n + steps + 1, graphs=True), prompt, steps)
    slow, slow_logits, _ = greedy(engine(adapter, schedule, n + steps + 1, graphs=False), prompt, steps)
    diff = max((a - b).abs().max().item() for a, b in zip(fast_logits, slow_logits, strict=True))
    ok &= fast == slow and diff <= 1e-3
    print(f"gemma3 fp32 {n} paper {schedule.keep}: graphs vs eager over {steps} steps: tokens "
          f"{'agree' if fast == slow else 'DIFFER'}, max abs {diff:.2e}, {revived} rows revived")
    return ok


def compare_scorers(n: int = 300, steps: int = 12) -> bool:
    """Every scorer's decoding under CUDA graphs equals the eager engine fed the same tokens (fp32, small model)
    within fp32 rounding: graphs lay out rows in buckets and eager at their exact count, and GEMMs of other
    shapes round differently (up to 1.1e-5 measured on the H200, logits of size ~10). Says whether a scorer's
    code could not be captured (the engine then runs it eagerly)."""
    model, config = small_model(3, torch.float32, initializer_range=0.1)
    adapter = adapter_for(model)
    prompt = torch.randint(0, config.vocab_size, (n,), device="cuda")
    ok = True
    for spec in ("last:1:0.5,2:0.5", "random:1:0.5,2:0.5", "static:1:0.5,2:0.5", "pool(k=5):1:0.5,2:0.5",
                 "protect:1:0.5,2:0.5"):
        schedule = lp.parse_schedule(f"{spec}+min=0", adapter.num_layers)
        fast_engine = engine(adapter, schedule, n + steps + 1, graphs=True)
        fast, fast_logits, revived = greedy(fast_engine, prompt, steps)
        _, slow_logits, _ = greedy(engine(adapter, schedule, n + steps + 1, graphs=False), prompt, steps, fast)
        diff = max((a - b).abs().max().item() for a, b in zip(fast_logits, slow_logits, strict=True))
        ok &= diff <= 1e-4
        refused = fast_engine._run_segment.refused
        print(f"{spec}: graphs vs eager max abs {diff:.1e}, {revived} rows revived, "
              f"{'captured' if refused is None else 'NOT captured: ' + refused[:90]}")
    return ok


def compare_split_kernel() -> bool:
    """The Triton split-K kernel against the written-out masked attention on random inputs: K/V outside S_l
    is NaN, so reading it would show. fp32 within 1e-5, bf16 within bf16 rounding."""
    from lazyprefill.decoding import masked_attention
    from lazyprefill.kernels.split_attention import split_attention

    ok, g = True, torch.Generator(device="cuda").manual_seed(0)
    for dtype, heads, kv_heads, R in [(torch.float32, 8, 2, 1), (torch.float32, 4, 4, 32), (torch.bfloat16, 32, 32, 1),
                                      (torch.bfloat16, 32, 8, 8), (torch.bfloat16, 32, 32, 4)]:
        B, T, P, dh = 3, 2900, 3001, 128
        t = torch.tensor([2899, 1500, 40], device="cuda")
        in_s = (torch.rand(B, T, device="cuda", generator=g) < 0.5) & (torch.arange(T, device="cuda") <= t[:, None])
        rows = torch.sort(torch.randint(0, 40, (B, R), device="cuda", generator=g), dim=1).values
        rows[:, -1] = t
        in_s[torch.arange(B, device="cuda")[:, None], rows] = True
        k = torch.randn(B, kv_heads, P, dh, device="cuda", generator=g).to(dtype)
        v = torch.randn(B, kv_heads, P, dh, device="cuda", generator=g).to(dtype)
        q = torch.randn(B, heads, R, dh, device="cuda", generator=g).to(dtype)
        mask = in_s[:, None, :] & (torch.arange(T, device="cuda") <= rows[:, :, None])
        want = masked_attention(q, k[:, :, :T], v[:, :, :T], mask, 0.088)
        poisoned_k, poisoned_v = k.clone(), v.clone()
        outside = ~in_s[:, None, :, None].expand(B, kv_heads, T, dh)
        poisoned_k[:, :, :T][outside] = float("nan")
        poisoned_v[:, :, :T][outside] = float("nan")
        listed = torch.full((B, T), P - 1, dtype=torch.int32, device="cuda")
        for b in range(B):
            members = in_s[b].nonzero()[:, 0].int()
            listed[b, : members.numel()] = members[torch.randperm(members.numel(), device="cuda", generator=g)]
        got = split_attention(q, poisoned_k, poisoned_v, listed, in_s.sum(1, dtype=torch.int32), rows.int(), 0.088)
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        good = rel <= (1e-5 if dtype == torch.float32 else 1e-2)
        ok &= good
        print(f"split kernel {dtype} H={heads} Hkv={kv_heads} R={R}: rel {rel:.2e} {'ok' if good else 'WRONG'}")
    return ok


def compare_sparse() -> bool:
    """Block-sparse attention through compiled FlexAttention against SDPA over the same keys masked element by
    element (bf16, llama3-8b's heads): the fused kernel reads the BlockMask's block lists, which the CPU tests
    (uncompiled FlexAttention applies the mask_mod everywhere) cannot check. Batches of two at three widths, one
    compile with dynamic shapes: rows padded to whole blocks (4000, 5000) and rows that fill them (4096), each
    told to the kernel as lengths that divide its tiles."""
    from lazyprefill.sparse import Sparse, sparse_attention

    torch.manual_seed(0)
    ok, dh = True, 128
    sparse = Sparse(top=0.1, local=2, min_tokens=0)
    for W, counts in ((4000, [4000, 3000]), (4096, [2900, 4096]), (5000, [5000, 4871])):
        q = torch.randn(2, 32, W, dh, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 8, W, dh, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        seen = sparse.blocks(q, k, counts, dh**-0.5, [True, True])  # [B, H, nb, nb]
        out = sparse_attention(q, k, v, sparse.block_mask(q, k, counts, dh**-0.5), dh**-0.5)
        keys = seen.repeat_interleave(sparse.block, 2).repeat_interleave(sparse.block, 3)[:, :, :W, :W]
        mask = keys & torch.ones(W, W, dtype=torch.bool, device="cuda").tril()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dh**-0.5,
                                                               enable_gqa=True)
        err = max((out[b, :, :n] - ref[b, :, :n]).abs().max().item() for b, n in enumerate(counts))
        good = err < 0.02
        ok &= good
        print(f"sparse attention bf16 at width {W} (density {seen.float().mean().item():.2f}): max abs {err:.2e} "
              f"{'ok' if good else 'WRONG'}")
    return ok


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    if sys.argv[1:] == ["sparse"]:
        if not compare_sparse():
            sys.exit("block-sparse attention differs from SDPA over the same keys")
        return
    if sys.argv[1:] == ["continuation"]:
        fp32 = compare_continuation(torch.float32)
        compare_continuation(torch.bfloat16)  # printed only: bf16 rounds differently in the two kernels
        if fp32 > 1e-3:
            sys.exit(f"a session's fp32 follow-up differs from a fresh prefill of the whole by {fp32:.2e} > 1e-3")
        return
    if sys.argv[1:] == ["windowed"]:
        if not compare_windowed():
            sys.exit("the sliding-window model differs from transformers, or its graphs from eager")
        return
    if len(sys.argv) > 1:  # a JSON of split_attention launch settings (from decode_attention.py --setting)
        from profile_stages import use_split_setting

        use_split_setting(sys.argv[1])
    fp32 = max(compare(torch.float32), compare_reference(), compare_batch(), compare_continuation(torch.float32))
    compare(torch.bfloat16)
    compare_continuation(torch.bfloat16)
    split = compare_split_kernel()
    graphs = compare_scorers() & compare_graphs() & compare_windowed()
    sparse = compare_sparse()
    if fp32 > 1e-3:
        sys.exit(f"fp32 logits differ from the reference by {fp32:.2e} > 1e-3")
    if not graphs:
        sys.exit("the CUDA-graph decoding path differs from the eager one, or a faster variant is less accurate")
    if not split:
        sys.exit("the split-K attention kernel differs from the written-out attention")
    if not sparse:
        sys.exit("block-sparse attention differs from SDPA over the same keys")


if __name__ == "__main__":
    main()
