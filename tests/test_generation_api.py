"""The Python API's contract around the engine: grad mode left to the caller, transformers' meaning of
`stop_strings` and `max_new_tokens`, validated sampling parameters and schedules, clear errors for a model
without its LM head or token ids that are not integers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model

import lazyprefill as lp
import lazyprefill.engine
import lazyprefill.generation
from lazyprefill.generation import SamplingParams

PROMPT = prompt_ids(24, seed=3)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa_rope3")


@pytest.fixture(scope="module")
def lazy(model):
    return lp.LazyLLM(model, schedule="paper")


class CharTokenizer:
    """Token i decodes to one letter, so that stop strings can be built from what the model generates."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def autograd_works_here() -> bool:
    """Normal grad mode: a tensor made here is an ordinary one and backward() runs through it."""
    x = torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    (w * x).sum().backward()
    return not torch.is_inference_mode_enabled() and not x.is_inference() and w.grad is not None


# ------------------------------------------------------------------ inference mode stays inside each step
def test_on_token_runs_in_the_callers_grad_mode(lazy):
    seen: list[bool] = []
    lazy.generate(PROMPT, max_new_tokens=5, eos_token_id=[], on_token=lambda _t: seen.append(autograd_works_here()))
    assert seen == [True] * 5


def test_a_paused_stream_leaves_grad_mode_to_the_caller(lazy):
    stream = lazy.stream(PROMPT, max_new_tokens=4, eos_token_id=[], return_logits=True)
    for _ in range(3):
        next(stream)
        assert autograd_works_here()
    with pytest.raises(StopIteration) as done:
        while True:
            next(stream)
    logits = done.value.value.logits[0]
    w = torch.ones_like(logits, requires_grad=True)
    (w * logits).sum().backward()  # the returned logits are ordinary tensors, usable in autograd
    assert torch.equal(w.grad, logits)


# ------------------------------------------------------------------ transformers' meaning of the options
def test_a_plain_string_is_one_stop_string(model):
    tok = CharTokenizer()
    lazy = lp.LazyLLM(model, schedule="paper", tokenizer=tok)
    free = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[]).new_tokens
    stop = tok.decode(free[6:8])
    end = next(j for j in range(len(free)) if stop in tok.decode(free[: j + 1]))
    out = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[], stop_strings=stop)
    assert out.finish_reason == "stop_string" and out.new_tokens == free[: end + 1]
    assert out.new_tokens == lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[], stop_strings=[stop]).new_tokens


@pytest.mark.parametrize("max_new_tokens", [0, -2, 2.0, True])
def test_max_new_tokens_is_at_least_one_as_in_transformers(lazy, max_new_tokens):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        lazy.generate(PROMPT, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1}, "temperature must be > 0"),
        ({"top_k": 0}, "top_k must be an int >= 1"),
        ({"top_k": 2.5}, "top_k must be an int >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"seed": "7"}, "seed must be an int"),
    ],
)
def test_sampling_parameters_are_checked_when_made(lazy, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(do_sample=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        lazy.generate(PROMPT, max_new_tokens=2, do_sample=True, **kwargs)


def test_the_request_is_checked_without_running_the_model(lazy, monkeypatch):
    monkeypatch.setattr(lazyprefill.engine.Engine, "prefill", lambda *_: pytest.fail("prefill ran"))
    with pytest.raises(ValueError, match=r"\+ max_new_tokens \(240\) = 264 exceeds the model's 256 positions"):
        lazy.check_request(PROMPT, 240)
    lazy.check_request([PROMPT.tolist(), [1, 2]], 200)  # a batch that fits: no error, nothing run


# ------------------------------------------------------------------ input that used to pass silently or crash
def test_a_list_of_floats_is_not_cast_to_ids(lazy):
    with pytest.raises(ValueError, match="integer token ids"):
        lazy.generate([1.0, 2.7, 3.0], max_new_tokens=2)


def test_a_base_model_without_lm_head_is_named(model):
    with pytest.raises(ValueError, match=r"pass the \*ForCausalLM model"):
        lp.LazyLLM(model.model)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("2:0.5,2:0.7", "layer 2 appears twice in the schedule"),
        ("", "the schedule is empty: use 'dense'"),
        ("  ", "the schedule is empty: use 'dense'"),
    ],
)
def test_schedule_strings_that_used_to_pass_silently(spec, match):
    with pytest.raises(ValueError, match=match):
        lp.parse_schedule(spec, 6)


def test_numpy_ratios_and_layers_are_numbers(model):
    schedule = lp.parse_schedule({np.int64(2): np.float32(0.5), 4: np.float64(0.25)}, 6)
    assert schedule.keep == {2: 0.5, 4: 0.25} and all(type(k) is int for k in schedule.keep)
    plain = lp.LazyLLM(model, {2: 0.5, 4: 0.25}).generate(PROMPT, max_new_tokens=4, eos_token_id=[])
    numpy = lp.LazyLLM(model, {np.int64(2): np.float32(0.5), 4: np.float64(0.25)})
    assert numpy.generate(PROMPT, max_new_tokens=4, eos_token_id=[]).new_tokens == plain.new_tokens


def test_a_one_layer_model_with_the_default_preset_says_to_run_dense():
    one = tiny_model("llama_gqa_rope3", num_layers=1)
    with pytest.raises(ValueError, match=r"1 layer, too few to prune .* run it dense") as err:
        lp.LazyLLM(one)
    assert "out of range" not in str(err.value)
    out = lp.LazyLLM(one, "dense").generate(PROMPT, max_new_tokens=2, eos_token_id=[])
    assert len(out.new_tokens) == 2


@pytest.mark.parametrize("family, schedule", [("llama_gqa_rope3", "paper"), ("gemma3", {2: 0.5}),
                                              ("llama_gqa_rope3", None)])
def test_a_kept_engine_serves_later_calls_as_a_new_one_would(family, schedule):
    """A LazyLLM keeps its last engine (cache, compiled kernels, CUDA graphs) for the next call of the same batch
    size that fits it: a long prompt, then a short one, a batch, then the long one again, each give exactly what
    a fresh LazyLLM gives, whatever the earlier calls left in the cache's slots."""
    model = tiny_model(family)
    lazy = lp.LazyLLM(model, schedule)
    calls = [([prompt_ids(90, seed=1)], 12), ([prompt_ids(40, seed=2)], 6), ([prompt_ids(30, seed=3)], 20),
             ([prompt_ids(50, seed=4), prompt_ids(20, seed=5)], 8), ([prompt_ids(90, seed=1)], 12)]
    engines = []
    for prompts, new in calls:
        got = lazy.generate(prompts, max_new_tokens=new, eos_token_id=[], return_logits=True)
        want = lp.LazyLLM(model, schedule).generate(prompts, max_new_tokens=new, eos_token_id=[], return_logits=True)
        for g, w in zip(got, want, strict=True):
            assert g.new_tokens == w.new_tokens
            for a, b in zip(g.logits, w.logits, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        engines.append(lazy._engine)
    assert engines[1] is engines[0] and engines[2] is engines[0]  # shorter calls reuse the first one's engine
    assert engines[3] is not engines[0]  # another batch size needs another cache
    assert engines[4] is not engines[3]
    lazy.release()
    assert lazy._engine is None


def test_a_call_that_fails_after_prefill_leaves_the_kept_engine_sound(monkeypatch):
    """A call that raises between prefill and its first decoding step (here: choosing the first token) must not
    leave that prefill's bookkeeping for the next call's sequences."""
    model = tiny_model("llama_gqa_rope3")
    lazy = lp.LazyLLM(model, "paper")
    real = lazyprefill.generation._choose
    monkeypatch.setattr(lazyprefill.generation, "_choose", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        lazy.generate(prompt_ids(90, seed=1), max_new_tokens=4)
    monkeypatch.setattr(lazyprefill.generation, "_choose", real)
    got = lazy.generate(prompt_ids(40, seed=2), max_new_tokens=12, eos_token_id=[])
    want = lp.LazyLLM(model, "paper").generate(prompt_ids(40, seed=2), max_new_tokens=12, eos_token_id=[])
    assert got.new_tokens == want.new_tokens
    np.testing.assert_array_equal(got.stats.prefill_depth, want.stats.prefill_depth)
