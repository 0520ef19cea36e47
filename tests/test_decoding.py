"""The decoding step's pieces: the host plan (no model needed), device-side selection, the cache's
clearing outside the prefill, compact traces, and no process-wide setting changed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model
from torch._dynamo.utils import counters
from torch._inductor.exc import InductorError

import lazyprefill as lp
import lazyprefill.decoding as decoding
from lazyprefill.adapters import adapter_for
from lazyprefill.cache import LazyCache
from lazyprefill.decoding import compile_dynamic, masked_attention, top_k
from lazyprefill.engine import DecodeOptions, Engine
from lazyprefill.plan import Segment, key_length, layout_rows, plan_step, row_bucket, segments


def test_segments_split_after_each_pruning_layer():
    assert segments(10, [3, 7]) == [Segment(0, 3, True), Segment(4, 7, True), Segment(8, 9, False)]
    assert segments(4, []) == [Segment(0, 3, False)]
    assert segments(6, [0, 4]) == [Segment(0, 0, True), Segment(1, 4, True), Segment(5, 5, False)]


def test_row_bucket_holds_n_from_a_short_ladder():
    assert [row_bucket(n) for n in (0, 1, 2, 8, 9, 33, 512, 513, 3000)] == [1, 1, 8, 8, 32, 128, 512, 1024, 4096]


def test_key_length_rounds_up_within_capacity():
    assert key_length(1, 1000) == 256
    assert key_length(8193, 10**6) == 8192 + 512 and key_length(8193, 8300) == 8300
    for n in range(1, 5000, 7):
        assert n <= key_length(n, 10**6) < n + max(256, n / 16)


def test_plan_sizes_follow_kept_count():
    """|S_l| per layer from the lengths alone, inactive sequences empty; static: prefill's sizes plus new tokens."""
    sched = lp.Schedule({1: 0.7, 3: 0.28})
    lengths = np.array([25, 9, 40])
    pruned = np.ones(3, dtype=bool)
    plan = plan_step(sched, True, lengths, [0, 2], 5, 64, np.zeros((3, 5), np.int64), np.array([20, 9, 30]), pruned)
    s1 = sched.kept_count(1, 26)
    assert plan.sizes[0].tolist() == [26, 26, s1, s1, sched.kept_count(3, s1)]
    assert plan.sizes[1].tolist() == [0] * 5 and plan.keep[:, 1].tolist() == [0, 0]
    assert plan.keep[:, 2].tolist() == [sched.kept_count(1, 41), sched.kept_count(3, sched.kept_count(1, 41))]
    assert plan.t.tolist() == [25, 9, 40] and plan.active.tolist() == [True, False, True]
    prefill = np.array([[20, 20, 14, 14, 4]] * 3)
    static = plan_step(sched, False, lengths, [0], 5, 64, prefill, np.array([20, 9, 30]), pruned)
    assert static.sizes[0].tolist() == [26, 26, 20, 20, 10]  # 20 kept + 5 generated + q
    short = plan_step(sched, True, lengths, [0, 2], 5, 64, prefill, np.array([20, 9, 30]),
                      np.array([False, True, True]))
    assert short.sizes[0].tolist() == [26] * 5 and short.sizes[2].tolist() == plan.sizes[2].tolist()


def test_top_k_matches_select_ties_by_position():
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.5, 0.2, 0.0], [0.3, 0.3, 0.3, 0.9, 0.3, 0.1]])
    in_s = torch.tensor([[True, True, True, True, True, False], [True, False, True, True, True, True]])
    is_q = torch.zeros_like(in_s)
    is_q[0, 4] = is_q[1, 5] = True
    kept = top_k(scores, in_s, is_q, torch.tensor([3, 3]))
    assert kept.tolist() == [[True, False, True, False, True, False], [True, False, False, True, False, True]]


def test_masked_attention_in_row_chunks_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    mask = torch.rand(2, 9, 30, generator=g) < 0.6
    mask[..., 0] = True
    whole = masked_attention(q, k, v, mask, 0.3)
    monkeypatch.setattr("lazyprefill.decoding.MASKED_ATTENTION_MAX_LOGITS", 2 * 4 * 30 * 2)  # 2 rows at a time
    torch.testing.assert_close(masked_attention(q, k, v, mask, 0.3), whole, rtol=0, atol=1e-6)


def test_masked_attention_logits_are_not_rounded_to_bf16():
    """bf16 inputs: the softmax sees fp32 logits, as an fp32 computation on the same bf16 values does."""
    g = torch.Generator().manual_seed(1)
    q = (4 * torch.randn(1, 2, 1, 64, generator=g)).bfloat16()
    k, v = torch.randn(1, 2, 50, 64, generator=g).bfloat16(), torch.randn(1, 2, 50, 64, generator=g).bfloat16()
    mask = torch.ones(1, 1, 50, dtype=torch.bool)
    got = masked_attention(q, k, v, mask, 0.125)
    p = (q.float() @ k.float().transpose(-1, -2) * 0.125).softmax(-1)
    want = (p.bfloat16().float() @ v.float()).bfloat16()
    assert torch.equal(got, want)


def poisoned_empty(real):
    """torch.empty that hands out NaN: memory a correct program never reads before writing."""

    def empty(*size, **kw):
        out = real(*size, **kw)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(-(2**30))

    return empty


def test_prefill_does_not_touch_room_for_new_tokens(monkeypatch):
    """TTFT cannot depend on max_new_tokens: prefill leaves K/V past the longest prompt as allocated (here NaN),
    decoding clears only the block of keys a step reads (plan.key_length), and the results equal an engine on
    ordinary memory."""
    adapter = adapter_for(tiny_model("llama_gqa_rope3"))
    prompts = [prompt_ids(20, seed=1), prompt_ids(13, seed=2)]
    schedule = lp.parse_schedule({1: 0.5, 3: 0.5}, adapter.num_layers)
    capacity, keys = 600, key_length(21, 600)  # the first step reads positions [0, 256)
    with torch.inference_mode():
        plain = Engine(adapter, schedule, capacity)
        want = [plain.prefill(prompts)[0]]
        plain.settle()
        token = want[0].argmax(-1)
        want += [plain.decode(token, [0, 1])[0] for _ in range(1)]
        monkeypatch.setattr(torch, "empty", poisoned_empty(torch.empty))
        engine = Engine(adapter, schedule, capacity)
        got = [engine.prefill(prompts)[0]]
        cache = engine.cache
        assert cache.k[:, :, :, :20].isfinite().all() and cache.v[:, :, :, :20].isfinite().all()
        assert cache.k[:, :, :, 20:capacity].isnan().all() and cache.v[:, :, :, 20:capacity].isnan().all()
        engine.settle()
        got += [engine.decode(token, [0, 1])[0] for _ in range(1)]
        assert cache.k[:, :, :, :keys].isfinite().all() and cache.v[:, :, :, :keys].isfinite().all()
        assert cache.k[:, :, :, keys:capacity].isnan().all() and cache.v[:, :, :, keys:capacity].isnan().all()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_trace_shares_arrays_within_a_segment():
    """A traced step keeps one S_l array per segment (between pruning layers), not one per layer."""
    model = tiny_model("qwen3")
    out = lp.LazyLLM(model, {1: 0.5, 3: 0.5}, trace=True).generate(prompt_ids(24), max_new_tokens=4, eos_token_id=[])
    for trace in out.stats.traces:
        distinct = {id(c) for c in trace.candidates}
        assert len(distinct) == 3 and trace.candidates[0] is trace.candidates[1]
        assert len({id(c) for c in trace.computed}) == 3


def test_decoding_leaves_sdpa_priority_alone():
    before = torch._C._get_sdp_priority_order()
    lp.LazyLLM(tiny_model("qwen3"), "paper").generate(prompt_ids(24), max_new_tokens=3)
    assert torch._C._get_sdp_priority_order() == before


def test_graphs_need_cuda():
    adapter = adapter_for(tiny_model("qwen3"))
    with pytest.raises(ValueError, match="CUDA graphs"):
        Engine(adapter, lp.parse_schedule("paper", adapter.num_layers), 32, decode=DecodeOptions(graphs=True))


def test_decode_options_say_what_to_change(monkeypatch):
    with pytest.raises(ValueError, match="graphs must be True, False or None"):
        DecodeOptions(graphs=1)
    with pytest.raises(ValueError, match=r"compile must be True, False or None .*, got 'yes'"):
        DecodeOptions(compile="yes")
    with pytest.raises(ValueError, match="graphs need the graph layout"):
        DecodeOptions(graphs=True, graph_layout=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter aside, Triton needs CUDA
    adapter = adapter_for(tiny_model("qwen3"))
    for options in (DecodeOptions(split_kernel=True), DecodeOptions(burst_kernel=True)):
        with pytest.raises(ValueError, match="Triton attention kernels need a CUDA model"):
            Engine(adapter, lp.parse_schedule("paper", adapter.num_layers), 32, decode=options)


@pytest.mark.parametrize("schedule", ["balanced", "paper", "revive(rows=2):1:0.4,3:0.5"])
def test_the_graph_layout_run_eagerly_decodes_what_the_compact_one_does(schedule, monkeypatch):
    """DecodeOptions(graph_layout=True) on the CPU: every slot computes, rows in buckets, the revival bound laid
    out in full (the GPU's data path without capture); the tokens, statistics and logits are the compact
    layout's."""
    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(48, seed=2), prompt_ids(30, seed=4), prompt_ids(9, seed=5)]
    kw = {"max_new_tokens": 10, "eos_token_id": [], "return_logits": True}
    buckets = []  # each segment's layout: in buckets, or at its exact rows

    def spied(n, keys, in_buckets=True):
        buckets.append(in_buckets)
        return layout_rows(n, keys, in_buckets)

    monkeypatch.setattr("lazyprefill.engine.layout_rows", spied)
    compact = lp.LazyLLM(model, schedule).generate(prompts, **kw)
    assert buckets and not any(buckets)
    buckets.clear()
    layout = lp.LazyLLM(model, schedule, decode=DecodeOptions(graph_layout=True))
    laid_out = layout.generate(prompts, **kw)
    assert buckets and all(buckets)
    assert any(o.stats.revived > 0 for o in compact)
    engine = layout._engine
    assert not engine.graphs and not engine.runner.compact  # every slot computes, nothing captured
    bound = engine.schedule.scorer.revival_rows
    assert engine._bounded == (None if bound is None else [1] + [bound] * (len(engine.segments) - 1))
    for a, b in zip(compact, laid_out, strict=True):
        assert a.new_tokens == b.new_tokens
        assert a.stats.to_dict() == b.stats.to_dict()
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("raised", ["error", "inductor"])
def test_a_selection_the_compiler_fails_on_runs_eagerly(monkeypatch, caplog, raised):
    """Where the compiler fails on a compiled selection (as torch 2.11's Triton code generation did on the GPU over
    several sequences at once, ending a server's step), the step runs it eagerly and decodes what eager decoding
    does; the failure is one warning that names its cause, and no later call tries to compile it again. A backend's
    own error reaches the caller wrapped by Dynamo; Inductor's reaches it as InductorError, unwrapped (the server's
    log on the GPU)."""
    tries = []

    def failing_backend(graph, example_inputs):
        tries.append(1)
        cause = TypeError("list indices must be integers or slices, not NoneType")
        raise cause if raised == "error" else InductorError(cause, None)

    real_compile = torch.compile

    def compile_failing_selection(fn, **kwargs):  # the other compiled functions stay eager: fast on the CPU
        return real_compile(fn, backend=failing_backend) if fn is decoding.score_and_reselect else fn

    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(48, seed=2), prompt_ids(30, seed=4)]
    kw = {"max_new_tokens": 8, "eos_token_id": [], "return_logits": True}
    want = lp.LazyLLM(model, "balanced").generate(prompts, **kw)
    monkeypatch.setattr(torch, "compile", compile_failing_selection)
    decoding.compile_dynamic.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="lazyprefill.decoding"):
            lazy = lp.LazyLLM(model, "balanced", decode=DecodeOptions(compile=True))
            got = lazy.generate(prompts, **kw)
            tried = len(tries)
            lazy.generate(prompts, **kw)
    finally:
        decoding.compile_dynamic.cache_clear()  # later tests compile for real
        torch._dynamo.reset()
    assert any(o.stats.revived > 0 for o in want)
    for a, b in zip(want, got, strict=True):
        assert a.new_tokens == b.new_tokens
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, rtol=1e-5)
    assert tried >= 1 and len(tries) == tried
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed on score_and_reselect; it runs eagerly from now on: "
        "TypeError: list indices must be integers or slices, not NoneType"]


@pytest.mark.parametrize("patch", ["lazyprefill.decoding.SDPA_MIN_ROWS", "lazyprefill.engine.GRAPH_MAX_ROWS"])
def test_revival_bursts_give_the_same_results(monkeypatch, patch):
    """Rows past the thresholds run through SDPA's memory-efficient attention / eagerly at their exact count:
    with the thresholds at 1 every multi-row segment takes those paths, and nothing changes but rounding."""
    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(48, seed=2), prompt_ids(30, seed=4)]
    kw = {"max_new_tokens": 10, "eos_token_id": [], "return_logits": True}
    llm = lp.LazyLLM(model, "1:0.4,3:0.5")
    default = llm.generate(prompts, **kw)
    assert any(o.stats.revived > 0 for o in default)
    monkeypatch.setattr(patch, 1)
    burst = llm.generate(prompts, **kw)
    for a, b in zip(default, burst, strict=True):
        assert a.new_tokens == b.new_tokens
        assert a.stats.to_dict() == b.stats.to_dict()
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa_rope3", "gemma3"])
@pytest.mark.parametrize(("options", "selection"), [({}, False), ({"pattern_matcher": False}, False),
                                                    ({"pattern_matcher": False}, True)],
                         ids=["inductor-defaults", "mm-and-add-apart", "defaults-selection-too"])
def test_compiled_layer_halves_decode_what_eager_ones_decode(family, options, selection, monkeypatch):
    """DecodeOptions(compile=True): torch.compile of block_qkv / block_finish, one version for every layer and
    row count (q alone, buckets, a burst), gives the eager engine's tokens, stats and logits (fp32 rounding), with
    Inductor's defaults, with the options that keep a residual add out of the GEMM (decoding.COMPILE_OPTIONS), and
    with the selection compiled too (COMPILE_SELECTION: its key and row counts vary as well)."""
    monkeypatch.setattr("lazyprefill.decoding.COMPILE_OPTIONS", options)
    monkeypatch.setattr("lazyprefill.decoding.COMPILE_SELECTION", selection)
    torch._dynamo.reset()  # a compiled version made under other options is not reused
    model = tiny_model(family)
    schedule = "0:0.5,2:0.6" if family == "gemma3" else "1:0.4,3:0.5"
    prompts = [prompt_ids(41, seed=7), prompt_ids(26, seed=8)]
    kw = {"max_new_tokens": 8, "eos_token_id": [], "return_logits": True}
    eager = lp.LazyLLM(model, schedule).generate(prompts, **kw)
    lazy = lp.LazyLLM(model, schedule, decode=DecodeOptions(compile=True))
    graphs = counters["stats"]["unique_graphs"]
    compiled = lazy.generate(prompts, **kw)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    lazy.generate([prompt_ids(33, seed=9)], max_new_tokens=6, eos_token_id=[])  # one sequence: a row is 1
    graphs = counters["stats"]["unique_graphs"]
    others = [prompt_ids(30, seed=10), prompt_ids(47, seed=11), prompt_ids(12, seed=12)]
    lazy.generate(others, max_new_tokens=6, eos_token_id=[])  # other row counts
    lazy.generate(others[:1], max_new_tokens=6, eos_token_id=[])
    assert counters["stats"]["unique_graphs"] == graphs, "a new row count compiled again"
    assert sum(o.stats.revived for o in eager) > 0
    for a, b in zip(eager, compiled, strict=True):
        assert b.new_tokens == a.new_tokens
        assert b.stats.to_dict() == a.stats.to_dict()
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-4, rtol=1e-4)


def test_compiled_selection_decodes_what_eager_selection_decodes_for_each_scorer():
    """decoding.score_and_reselect compiles the scorer with the selection: a wrapped scorer (the default's revival
    bound, whose keep count is a device tensor), a pooled one and the random baseline give the eager engine's
    results."""
    torch._dynamo.reset()
    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(41, seed=7), prompt_ids(26, seed=8)]
    kw = {"max_new_tokens": 6, "eos_token_id": [], "return_logits": True}
    for scorer in ["revive(rows=4)", "pool(k=3, of=last)", "random"]:
        schedule = f"{scorer}:1:0.4,3:0.5"
        eager = lp.LazyLLM(model, schedule).generate(prompts, **kw)
        graphs = counters["stats"]["unique_graphs"]
        compiled = lp.LazyLLM(model, schedule, decode=DecodeOptions(compile=True)).generate(prompts, **kw)
        assert counters["stats"]["unique_graphs"] > graphs, f"{scorer}: its selection was not compiled"
        for a, b in zip(eager, compiled, strict=True):
            assert b.new_tokens == a.new_tokens
            assert b.stats.to_dict() == a.stats.to_dict()
            torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-4, rtol=1e-4)


def test_engines_of_one_model_share_their_compiled_functions(monkeypatch):
    """Every engine used to build its own torch.compile wrappers (5 ms of host time on the CPU, in each prefill that
    `bench` times and each server pool): engines of one adapter now share them, and new compile options make new
    ones."""
    adapter = adapter_for(tiny_model("llama_gqa_rope3"))
    schedule = lp.Schedule({1: 0.5})
    first, second = (Engine(adapter, schedule, 64, decode=DecodeOptions(compile=True), batch=b) for b in (1, 2))
    assert first.runner.layers is second.runner.layers and first.runner._select is second.runner._select
    monkeypatch.setattr("lazyprefill.decoding.COMPILE_OPTIONS", {"max_autotune": False})
    third = Engine(adapter, schedule, 64, decode=DecodeOptions(compile=True), batch=1)
    assert third.runner.layers is not first.runner.layers


def test_compile_dynamic_keeps_a_version_for_each_of_many_scorers():
    """A compiled function that takes the scorer compiles a version per scorer; with Dynamo's default limit (8
    versions) the ninth scorer of a process (tune tries several, each in up to four versions) would run eagerly."""
    torch._dynamo.reset()
    score = compile_dynamic(lambda scorer, x: scorer.score(x))
    x = torch.ones(3)
    for i in range(12):  # a class of its own each, as distinct scorers are distinct code to Dynamo
        scorer = type(f"Scorer{i}", (), {"score": lambda self, x: x * 2})()
        graphs = counters["stats"]["unique_graphs"]
        assert torch.equal(score(scorer, x), x * 2)
        assert counters["stats"]["unique_graphs"] > graphs, f"scorer {i} ran eagerly"


@pytest.mark.parametrize("schedule", ["dense", "paper", "revive(rows=4):paper"])
def test_steps_enqueued_ahead_give_what_steps_one_at_a_time_give(schedule):
    """DecodeOptions(ahead=True) on the CPU: each step is enqueued before the last one's tokens are read, and a
    sequence that stops at EOS takes one step more, which its output drops."""
    model = tiny_model("llama_gqa_rope3")
    prompts = [list(range(5, 45)), list(range(9, 30))]
    plain = lp.LazyLLM(model, schedule, decode=DecodeOptions(ahead=False)).generate(prompts, 10, eos_token_id=[])
    new = plain[0].new_tokens
    stop = next(k for k in range(2, 10) if new[k] not in new[:k])  # sequence 0 stops there, by EOS
    eos = new[stop]
    want = lp.LazyLLM(model, schedule, decode=DecodeOptions(ahead=False)).generate(
        prompts, 10, eos_token_id=eos, return_logits=True)
    got = lp.LazyLLM(model, schedule, decode=DecodeOptions(ahead=True)).generate(
        prompts, 10, eos_token_id=eos, return_logits=True)
    assert want[0].finish_reason == "eos" and len(want[0].new_tokens) == stop + 1
    for a, b in zip(want, got, strict=True):
        assert (b.new_tokens, b.finish_reason) == (a.new_tokens, a.finish_reason)
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits))
        assert b.stats.steps == a.stats.steps
        assert b.stats.final_depth.shape == a.stats.final_depth.shape


def test_kv_rows_land_where_advanced_indexing_puts_them():
    """LazyCache.write_kv's index_copy_ over flattened rows, and write_kv_pair's one copy of K and V stacked, store
    each (sequence, position) row of every head where `k[layer][seq, :, pos] = k` would, and touch nothing else."""
    a = adapter_for(tiny_model("llama_gqa_rope3"))
    cache = LazyCache(a, batch=3, capacity=20)
    cache.ensure_clean(cache.capacity + 1)
    seq, pos = torch.tensor([0, 2, 2, 1, 0]), torch.tensor([5, 0, 19, 7, 20])  # 20: the scratch slot
    k, v = (torch.randn(5, a.num_kv_heads, a.head_dim) for _ in range(2))
    want_k, want_v = cache.k.clone(), cache.v.clone()
    want_k[2][seq, :, pos], want_v[2][seq, :, pos] = k, v
    cache.write_kv(2, seq, pos, k, v)
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
    cache.write_kv(4, seq, pos, v, k, cache.kv_index(seq, pos))  # the index made once and handed over
    assert torch.equal(cache.k[4][seq, :, pos], v) and torch.equal(cache.v[4][seq, :, pos], k)
    want_k, want_v = cache.k.clone(), cache.v.clone()
    want_k[1][seq, :, pos], want_v[1][seq, :, pos] = k, v
    cache.write_kv_pair(1, seq, pos, torch.stack([k, v]), cache.kv_index(seq, pos))
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
