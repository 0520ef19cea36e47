"""Every registered scorer, composed with a schedule, against the float64 reference's own scoring loops.

The matrix runs over the registry (each scorer with its defaults) plus variants that set every field,
so a new scorer is tested as soon as it is registered, and fails here until the reference knows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model
from reference import Reference

import lazyprefill as lp
from lazyprefill import scoring

DECODE_STEPS = 5
KEEP = {1: 0.5, 3: 0.6}  # two pruning layers of six, so that decoding revives
VARIANTS = [
    "last(heads=max)",
    "window(w=4)",
    "window(w=40, heads=max)",  # more rows than the prompt has: every row scores
    "pool(k=3)",
    "pool(k=5, of=window(w=4))",
    "protect(sink=2, recent=3)",
    "protect(sink=0, recent=0, of=pool(k=3))",
    "static(of=pool(k=3))",
    "random(seed=5)",
    "revive(rows=2)",
    "revive(rows=3, of=pool(k=3))",
]
SPECS = [name for name in scoring.SCORERS] + VARIANTS


def test_every_registered_scorer_is_in_the_matrix():
    assert set(scoring.SCORERS) <= {scoring.parse_scorer(s).name for s in SPECS}


@pytest.fixture(scope="module", params=[(f, s) for f in ("llama_gqa_rope3", "qwen3") for s in SPECS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    family, spec = request.param
    model = tiny_model(family)
    ids = prompt_ids(32, seed=3)
    schedule = lp.Schedule(KEEP, scorer=scoring.parse_scorer(spec))
    out = lp.LazyLLM(model, schedule=schedule, trace=True).generate(
        ids, max_new_tokens=DECODE_STEPS + 1, eos_token_id=[], return_logits=True
    )
    ref = Reference(model, schedule.keep, schedule.scorer)
    ref_logits = [ref.prefill(ids.tolist())] + [ref.decode(t) for t in out.new_tokens[:-1]]
    return schedule, out, ref, ref_logits


def test_scores_match_the_reference(case):
    _, out, ref, _ = case
    for step, (trace, expected) in enumerate(zip(out.stats.traces, ref.steps, strict=True)):
        assert sorted(trace.scores) == sorted(expected.scores), f"step {step}: scored at other layers"
        for layer, scores in expected.scores.items():
            pos, s = trace.scores[layer]
            assert pos.tolist() == sorted(scores)
            np.testing.assert_allclose(s, [scores[p] for p in sorted(scores)], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {step} layer {layer}")


def test_candidates_computed_rows_and_logits_match_the_reference(case):
    _, out, ref, ref_logits = case
    for step, (trace, expected) in enumerate(zip(out.stats.traces, ref.steps, strict=True)):
        assert [c.tolist() for c in trace.candidates] == expected.candidates, f"S_l differ at step {step}"
        assert [c.tolist() for c in trace.computed] == expected.computed, f"computed rows differ at step {step}"
    for step, (got, want) in enumerate(zip(out.logits, ref_logits, strict=True)):
        assert (got.double() - want).abs().max().item() <= 1e-4, f"step {step}"
    assert out.stats.final_depth.tolist() == ref.depth


def test_reselecting_scorers_revive_and_static_ones_never_do(case):
    schedule, out, _, _ = case
    if schedule.scorer.reselects:
        assert out.stats.revived > 0, "with two pruning layers and 5 steps every reselecting scorer revives"
    else:
        assert out.stats.revived == 0


@pytest.mark.parametrize("spec", ["window(w=4)", "pool(k=5, of=window(w=4))", "protect(sink=2, recent=3)",
                                  "random(seed=5)", "revive(rows=2)"])
def test_a_batch_scores_each_sequence_as_alone(spec):
    """Invariant 6 for the scorers that read more than q's row, positions, or a seed."""
    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(n, seed=n) for n in (30, 3, 41)]
    scorer = scoring.parse_scorer(spec)
    kw = dict(max_new_tokens=6, eos_token_id=[], return_logits=True)
    batch = lp.LazyLLM(model, lp.Schedule(KEEP, scorer=scorer)).generate(prompts, **kw)
    for b, (prompt, got) in enumerate(zip(prompts, batch, strict=True)):
        alone_scorer = scoring.Random(seed=scorer.seed + b) if isinstance(scorer, scoring.Random) else scorer
        alone = lp.LazyLLM(model, lp.Schedule(KEEP, scorer=alone_scorer)).generate(prompt, **kw)
        assert got.new_tokens == alone.new_tokens
        assert got.stats.to_dict() == alone.stats.to_dict()
        for x, y in zip(got.logits, alone.logits, strict=True):
            assert (x - y).abs().max().item() <= 1e-5


def test_protected_tokens_survive_every_pruning_layer():
    """40 -> 20 -> 12 candidates: room for the 3 sinks, the 4 recent tokens and q at every layer."""
    scorer = scoring.parse_scorer("protect(sink=3, recent=4)")
    out = lp.LazyLLM(tiny_model("qwen3"), lp.Schedule({1: 0.5, 3: 0.6}, scorer=scorer), trace=True).generate(
        prompt_ids(40), max_new_tokens=4, eos_token_id=[]
    )
    for step, trace in enumerate(out.stats.traces):
        t = 39 + step
        must = {0, 1, 2, *range(t - 4, t + 1)}
        assert must <= set(trace.candidates[-1].tolist()), f"step {step}"


def test_pool_keeps_a_span_whole_that_last_splits():
    """One key's score is high; pooling lends it to its neighbours, so they are kept with it."""
    pos = torch.arange(10)[None]
    s = torch.zeros(1, 10)
    s[0, 5] = 1.0

    class Fixed(scoring.Scorer):
        name = "fixed"

        def score(self, x):
            return s

    x = scoring.ScoreInput(torch.zeros(1, 1, 1, 2), pos[:, -1:], torch.zeros(1, 1, 10, 2), pos, None, 1.0, 0, 10)
    pooled = scoring.Pool(k=3, of=Fixed()).score(x)
    assert pooled[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("spec", SPECS)
def test_scorer_text_round_trips(spec):
    scorer = scoring.parse_scorer(spec)
    assert scoring.parse_scorer(scorer.spec()) == scorer


@pytest.mark.parametrize(
    "text, keep, scorer",
    [
        ("paper", {2: 0.7, 4: 0.7, 6: 0.7}, "last"),
        ("static", {2: 0.7, 4: 0.7, 6: 0.7}, "static"),
        ("lazy:2:0.5", {2: 0.5}, "last"),
        ("window(w=8):1:0.5,4:0.25", {1: 0.5, 4: 0.25}, "window(w=8)"),
        ("pool(k=5, of=window(w=8)):balanced", {5: 0.3}, "pool(k=5, of=window(w=8))"),
        ("protect", {2: 0.7, 4: 0.7, 6: 0.7}, "protect"),
    ],
)
def test_schedule_text_names_a_scorer(text, keep, scorer):
    schedule = lp.parse_schedule(text, 8)
    assert schedule.keep == keep
    assert schedule.scorer == scoring.parse_scorer(scorer)
    assert lp.parse_schedule(schedule.describe(), 8) == schedule


def test_schedule_file_round_trips_through_the_api(tmp_path):
    schedule = lp.Schedule({1: 0.5, 3: 0.6}, scorer=scoring.parse_scorer("pool(k=5, of=window(w=4))"))
    path = schedule.save(tmp_path / "s.json", num_layers=6, model="tiny")
    model = tiny_model("llama_gqa_rope3")
    assert lp.LazyLLM(model, schedule=path).schedule == schedule
    assert lp.LazyLLM(model, schedule=str(path)).schedule == schedule


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist: write one with `lazyprefill tune`"),
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe\x00binary", "is not valid JSON"),
        ('{"keep": {"1": 0.5}}', 'needs "format": "lazyprefill-schedule/1"'),
        ('{"format": "lazyprefill-schedule/1"}', 'needs "keep"'),
        ('{"format": "lazyprefill-schedule/1", "keep": {"one": 0.5}}', "must be layer indices"),
        ('{"format": "lazyprefill-schedule/1", "keep": {"1": 2.0}}', r"keep ratio 2.0 at layer 1 must be in \(0, 1\]"),
        ('{"format": "lazyprefill-schedule/1", "keep": {"9": 0.5}}', "pruning layer 9 is out of range"),
        ('{"format": "lazyprefill-schedule/1", "keep": {"1": 0.5}, "scorer": "banana"}', "unknown scorer 'banana'"),
        ('{"format": "lazyprefill-schedule/1", "keep": {"1": 0.5}, "scorer": 3}', '"scorer" must be a string'),
        ('{"format": "lazyprefill-schedule/1", "keep": {"1": 0.5}, "num_layers": 30}', "tuned for a model with 30"),
    ],
)
def test_bad_schedule_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        lp.LazyLLM(tiny_model("llama_gqa_rope3"), schedule=path)


def revive_run(scorer: scoring.Scorer, bounded_layout: bool = False):
    """Greedy prefill + 8 decoding steps of a 48-token prompt under KEEP, fp32 (tokens, logits, stats)."""
    model = tiny_model("llama_gqa_rope3")
    lazy = lp.LazyLLM(model, lp.Schedule(KEEP, scorer=scorer))
    if bounded_layout:  # as on CUDA with graphs: every segment laid out at the bound, no count read mid-step
        original = lazy.engine_for

        def engine_for(*args, **kwargs):
            engine = original(*args, **kwargs)
            engine._bounded = [1] + [scorer.revival_rows] * (len(engine.segments) - 1)
            return engine

        lazy.engine_for = engine_for
    out = lazy.generate(prompt_ids(48, seed=7), max_new_tokens=8, eos_token_id=[], return_logits=True)
    return out.new_tokens, out.logits, out.stats


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_revive_computes_at_most_its_rows_after_each_pruning_layer(rows):
    _, _, stats = revive_run(scoring.Revive(rows=rows))
    _, _, unbounded = revive_run(scoring.Last())
    after = [layer + 1 for layer in KEEP]
    for step in stats.steps[1:]:  # decoding steps
        assert all(step.computed[layer] <= rows for layer in after)
    assert max(s.computed[a] for s in unbounded.steps[1:] for a in after) > rows, "the bound must bind here"
    assert (stats.revived == 0) == (rows == 1)


def test_revive_with_room_for_every_row_is_the_paper_rule():
    tokens, logits, stats = revive_run(scoring.Revive(rows=10_000))
    want_tokens, want_logits, want_stats = revive_run(scoring.Last())
    assert tokens == want_tokens and stats.to_dict() == want_stats.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))


def test_revive_laid_out_at_its_bound_computes_what_waiting_for_counts_computes():
    """On CUDA with graphs a bounded step lays every segment out at the bound and reads no count mid-step."""
    waited = revive_run(scoring.Revive(rows=3))
    laid_out = revive_run(scoring.Revive(rows=3), bounded_layout=True)
    assert laid_out[0] == waited[0] and laid_out[2].to_dict() == waited[2].to_dict()
    assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(laid_out[1], waited[1], strict=True))


@pytest.mark.parametrize(("spec", "match"), [("revive(rows=0)", "rows=0"), ("revive(of=static)", "prefill only")])
def test_bad_revive(spec, match):
    with pytest.raises(ValueError, match=match):
        scoring.parse_scorer(spec)


def test_revive_wraps_a_preset():
    schedule = lp.parse_schedule("revive(rows=8):paper", 30)
    assert schedule.keep == lp.parse_schedule("paper", 30).keep
    assert schedule.scorer == scoring.Revive(rows=8) and schedule.scorer.revival_rows == 8
