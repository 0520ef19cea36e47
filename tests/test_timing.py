"""The TTFT protocol of `lazyprefill generate`, kept once in bench.time_methods: check, warm up, interleaved rounds."""

from __future__ import annotations

import pytest
from helpers import prompt_ids, tiny_model

import lazyprefill as lp
from lazyprefill.bench import time_methods

PROMPTS = [prompt_ids(30).tolist(), prompt_ids(20, seed=1).tolist()]


@pytest.fixture
def methods(monkeypatch):
    """LazyLLM and dense, each recording (method, max_new_tokens) of every generate call in `calls`."""
    model = tiny_model("llama_gqa_rope3")
    methods = {"lazy": lp.LazyLLM(model, "paper"), "dense": lp.LazyLLM(model, None)}
    calls: list[tuple[str, int]] = []
    for name, llm in methods.items():
        def record(prompts, max_new_tokens, name=name, real=llm.generate, **kw):
            calls.append((name, max_new_tokens))
            return real(prompts, max_new_tokens=max_new_tokens, **kw)

        monkeypatch.setattr(llm, "generate", record)
    return methods, calls


def test_one_warm_up_then_interleaved_rounds_the_first_one_full_length(methods):
    methods, calls = methods
    outputs, ttfts = time_methods(methods, PROMPTS, max_new_tokens=5, repeats=3)
    warm_up, first, later = [("lazy", 1), ("dense", 1)], [("lazy", 5), ("dense", 5)], [("lazy", 1), ("dense", 1)]
    assert calls == warm_up + first + later + later
    assert {name: len(times) for name, times in ttfts.items()} == {"lazy": 3, "dense": 3}
    assert all(t > 0 for times in ttfts.values() for t in times)
    dense = lp.LazyLLM(tiny_model("llama_gqa_rope3"), None).generate(PROMPTS, max_new_tokens=5)
    assert [o.new_tokens for o in outputs["dense"]] == [o.new_tokens for o in dense]  # the first round's answers


def test_a_request_too_long_fails_before_the_warm_up(methods):
    methods, calls = methods
    with pytest.raises(ValueError, match=r"max_new_tokens \(240\)"):
        time_methods(methods, PROMPTS, max_new_tokens=240, repeats=2)
    assert calls == []
