"""Bad input fails early with a message that says what to change, and leaves LazyLLM usable.

Also the generation controls around the engine: sampling determinism, EOS, stop strings, streaming.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from helpers import COMMON, VOCAB, prompt_ids, tiny_model

import lazyprefill as lp

PROMPT = prompt_ids(20, seed=11)
MAX_POSITIONS = COMMON["max_position_embeddings"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama_gqa_rope3")


@pytest.fixture(scope="module")
def lazy(model):
    return lp.LazyLLM(model, schedule="paper")


@pytest.fixture(scope="module")
def baseline(lazy) -> list[int]:
    return lazy.generate(PROMPT, max_new_tokens=8, eos_token_id=[]).new_tokens


def assert_still_works(lazy: lp.LazyLLM, baseline: list[int]) -> None:
    out = lazy.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    assert out.new_tokens == baseline


class CharTokenizer:
    """Just enough tokenizer for stop strings and `text`: token i decodes to one letter."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


# ----------------------------------------------------------------- bad generate() input
@pytest.mark.parametrize(
    "input_ids, max_new_tokens, match",
    [
        ([], 4, "prompt is empty"),
        (torch.tensor([], dtype=torch.long), 4, "prompt is empty"),
        (prompt_ids(250), 10, "exceeds the model's 256 positions"),
        (prompt_ids(10), MAX_POSITIONS, "exceeds the model's 256 positions"),
        ([1, 2, -1], 4, "token id -1 is outside the vocabulary"),
        (torch.tensor([5, VOCAB, 7]), 4, f"token id {VOCAB} is outside the vocabulary"),
        ([3, 10**6], 4, "outside the vocabulary"),
        (prompt_ids(10), -1, "max_new_tokens must be a positive int"),
        (prompt_ids(10), 2.5, "max_new_tokens must be a positive int"),
        (prompt_ids(6).float(), 4, "integer token ids"),
    ],
    ids=[
        "empty-list",
        "empty-tensor",
        "prompt-plus-new-too-long",
        "new-alone-too-long",
        "negative-id",
        "id-equal-vocab",
        "id-far-beyond-vocab",
        "negative-max-new",
        "float-max-new",
        "float-ids",
    ],
)
def test_bad_generate_input(lazy, baseline, input_ids, max_new_tokens, match):
    with pytest.raises(ValueError, match=match):
        lazy.generate(input_ids, max_new_tokens=max_new_tokens)
    assert_still_works(lazy, baseline)


def test_the_last_position_is_still_allowed(lazy):
    out = lazy.generate(prompt_ids(250), max_new_tokens=MAX_POSITIONS - 250, eos_token_id=[])
    assert out.sequences.shape == (1, MAX_POSITIONS)


def test_stop_strings_need_a_tokenizer(lazy, baseline):
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        lazy.generate(PROMPT, max_new_tokens=4, stop_strings=["x"])
    assert_still_works(lazy, baseline)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_sampling_needs_positive_temperature(lazy, baseline, temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lazy.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=temperature)
    assert_still_works(lazy, baseline)


def test_every_one_sequence_form_gives_the_same_answer(lazy, baseline):
    assert lazy.generate(PROMPT.tolist(), max_new_tokens=8, eos_token_id=[]).new_tokens == baseline
    assert lazy.generate(PROMPT.int(), max_new_tokens=8, eos_token_id=[]).new_tokens == baseline
    assert lazy.generate(PROMPT.numpy(), max_new_tokens=8, eos_token_id=[]).new_tokens == baseline
    mask = torch.ones_like(PROMPT)
    assert lazy.generate(PROMPT, attention_mask=mask, max_new_tokens=8, eos_token_id=[]).new_tokens == baseline


def test_two_dimensional_input_is_a_batch_even_of_one(lazy, baseline):
    """The output type follows the input's rank, never the batch size, so batch code has no special case."""
    for batch in (PROMPT[None], [PROMPT.tolist()], [PROMPT], [PROMPT.numpy()]):
        outs = lazy.generate(batch, max_new_tokens=8, eos_token_id=[])
        assert isinstance(outs, list) and [o.new_tokens for o in outs] == [baseline]


# ----------------------------------------------------------------- bad batches
SHORT, LONG = prompt_ids(10, 1), prompt_ids(250, 2)
PADDED = torch.stack([PROMPT, torch.cat([PROMPT[:5], torch.zeros(len(PROMPT) - 5, dtype=torch.long)])])
RIGHT_PAD_MASK = torch.stack([torch.ones(len(PROMPT), dtype=torch.long), (torch.arange(len(PROMPT)) < 5).long()])


@pytest.mark.parametrize(
    "input_ids, kwargs, match",
    [
        ([SHORT.tolist(), []], {}, "sequence 1 of the batch is empty"),
        ([SHORT, SHORT[:0]], {}, "sequence 1 of the batch is empty"),
        (torch.empty(0, 5, dtype=torch.long), {}, "the batch is empty"),
        ([], {"attention_mask": []}, "the prompt is empty"),
        (PADDED, {"attention_mask": RIGHT_PAD_MASK * torch.tensor([[1], [0]])}, "sequence 1 of the batch is empty"),
        (PADDED, {"attention_mask": RIGHT_PAD_MASK[:, :-1]}, r"has shape \(2, 19\) but input_ids has shape \(2, 20\)"),
        (PADDED, {"attention_mask": RIGHT_PAD_MASK[:1]}, "attention_mask has shape .* must match"),
        (PADDED, {"attention_mask": 2 * RIGHT_PAD_MASK}, r"only 1 \(token\) and 0 \(padding\)"),
        (PADDED, {"attention_mask": RIGHT_PAD_MASK.flip(1).roll(3, 1)}, "mask row 1 has padding between tokens"),
        ([SHORT.tolist(), LONG.tolist()], {"attention_mask": [[1] * 10, [1] * 250]}, "mask goes with one padded"),
        ([SHORT, LONG], {}, r"sequence 1 of the batch \(250 tokens\) \+ max_new_tokens \(10\) = 260 exceeds"),
        ([SHORT.tolist(), [1, VOCAB]], {}, rf"token id {VOCAB} \(in sequence 1 of the batch\) is outside"),
        ([SHORT, SHORT.float()], {}, "integer token ids"),
        (torch.zeros(2, 2, 2, dtype=torch.long), {}, r"input_ids must be \[n\] or \[batch, n\]"),
    ],
    ids=[
        "empty-list-in-batch", "empty-tensor-in-batch", "no-sequences", "empty-with-mask", "all-padding-row",
        "mask-one-column-short", "mask-one-row-short", "mask-not-binary", "mask-with-hole", "ragged-with-mask",
        "longest-beyond-positions", "id-beyond-vocab-in-row", "float-row", "three-dimensional",
    ],
)
def test_bad_batch_input(lazy, baseline, input_ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lazy.generate(input_ids, max_new_tokens=10, **kwargs)
    assert_still_works(lazy, baseline)


# ----------------------------------------------------------------- bad schedules and models
@pytest.mark.parametrize(
    "schedule, match",
    [
        ("fast", "unknown schedule 'fast'"),
        ("paper-ish", "unknown schedule"),
        ("1:0.5,oops", "unknown schedule"),
        ("9:0.7", r"pruning layer 9 is out of range: this model has 6 layers.*\[0, 4\]"),
        ({-1: 0.5}, "pruning layer -1 is out of range"),
        ({5: 0.5}, "the last layer cannot prune"),
        ("static:5:0.5", "the last layer cannot prune"),
        ({1: 0.0}, r"keep ratio 0.0 at layer 1 must be in \(0, 1\]"),
        ("1:0", r"must be in \(0, 1\]"),
        ({1: -0.5}, r"keep ratio -0.5 at layer 1 must be in \(0, 1\]"),
        ({1: 1.5}, r"keep ratio 1.5 at layer 1 must be in \(0, 1\]"),
        ("random:2:1.01", r"must be in \(0, 1\]"),
        (lp.Schedule({7: 0.5}), "pruning layer 7 is out of range"),
        ("lazier:paper", "unknown schedule 'lazier:paper'"),
        ("pool(k=4):paper", "pooling width must be an odd int"),
        ("pool(k=7:paper", r"missing '\)'"),
        ("window(size=3):paper", "scorer 'window' has no field 'size'; its fields: w, heads"),
        ("window(w=three):paper", "w='three' must be an int"),
        ("last(heads=median):paper", "use heads=mean"),
        ("protect(of=banana)", "unknown scorer 'banana': scorers are last"),
        ("pool(k=3)paper", "put a ':' between the scorer"),
    ],
)
def test_bad_schedule(model, baseline, schedule, match):
    with pytest.raises(ValueError, match=match):
        lp.LazyLLM(model, schedule=schedule)
    assert_still_works(lp.LazyLLM(model, schedule="paper"), baseline)


def test_bad_schedule_object():
    with pytest.raises(ValueError, match=r"keep ratio 0 at layer 2 must be in \(0, 1\]"):
        lp.Schedule({2: 0})
    with pytest.raises(ValueError, match="scorer must be a Scorer"):
        lp.Schedule({2: 0.5}, scorer="lazier")


@pytest.mark.parametrize(
    "config",
    [
        tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
        tf.GemmaConfig(**{**COMMON, "num_hidden_layers": 2}),
    ],
    ids=lambda c: c.model_type,
)
def test_unsupported_architecture(model, baseline, config):
    other = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match=rf"unsupported architecture '{config.model_type}'.*llama.*qwen3"):
        lp.LazyLLM(other, schedule="paper")
    assert_still_works(lp.LazyLLM(model, schedule="paper"), baseline)


# ----------------------------------------------------------------- generation controls
def test_sampling_is_reproducible_by_seed(lazy):
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=100, top_p=0.95, eos_token_id=[])
    first = lazy.generate(PROMPT, seed=7, **kw).new_tokens
    assert lazy.generate(PROMPT, seed=7, **kw).new_tokens == first
    others = {tuple(lazy.generate(PROMPT, seed=s, **kw).new_tokens) for s in (1, 2, 3)}
    assert len(others | {tuple(first)}) > 1, "different seeds should give different samples"


def test_top_k_one_sampling_is_greedy(lazy, baseline):
    out = lazy.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=1, seed=0, eos_token_id=[])
    assert out.new_tokens == baseline


def test_eos_stops_right_after_the_eos_token(lazy):
    free = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[]).new_tokens
    eos = free[5]
    stop = free.index(eos)
    for eos_arg in (eos, [VOCAB - 1 if eos != VOCAB - 1 else 0, eos]):
        out = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=eos_arg)
        assert out.finish_reason == "eos"
        assert out.new_tokens == free[: stop + 1]
        assert out.sequences[0].tolist() == PROMPT.tolist() + free[: stop + 1]


@pytest.mark.parametrize("eos_in_config", [0, [0]], ids=["int", "list"])
def test_default_eos_comes_from_the_generation_config(model, eos_in_config):
    """With eos_token_id=None the model's generation config decides, including id 0 (SmolLM2 base, GPT-NeoX)."""
    first = lp.LazyLLM(model, schedule="paper").generate(PROMPT, max_new_tokens=1, eos_token_id=[]).new_tokens[0]
    emits_zero = copy.deepcopy(model)
    with torch.no_grad():  # token 0 now outscores the model's first choice
        emits_zero.lm_head.weight[0] = 1.5 * emits_zero.lm_head.weight[first]
    emits_zero.config.eos_token_id = None
    emits_zero.generation_config.eos_token_id = eos_in_config
    out = lp.LazyLLM(emits_zero, schedule="paper").generate(PROMPT, max_new_tokens=6)
    assert out.new_tokens == [0] and out.finish_reason == "eos"


def test_length_limit(lazy):
    out = lazy.generate(PROMPT, max_new_tokens=5, eos_token_id=[])
    assert out.finish_reason == "length" and len(out.new_tokens) == 5
    assert len(out.stats.steps) == 5  # prefill + 4 decoding steps: the last token is never fed back


def test_stop_string_stops_and_text_is_decoded(model):
    tok = CharTokenizer()
    lazy = lp.LazyLLM(model, schedule="paper", tokenizer=tok)
    free = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[]).new_tokens
    stop = tok.decode(free[4:6])
    end = next(j for j in range(len(free)) if stop in tok.decode(free[: j + 1]))
    out = lazy.generate(PROMPT, max_new_tokens=16, eos_token_id=[], stop_strings=[stop])
    assert out.finish_reason == "stop_string"
    assert out.new_tokens == free[: end + 1]
    assert out.text == tok.decode(free[: end + 1])


@pytest.mark.parametrize("sampling", [False, True])
def test_stream_and_callback_yield_the_generated_tokens(lazy, sampling):
    kw = dict(max_new_tokens=10, eos_token_id=[], do_sample=sampling, seed=5)
    seen: list[int] = []
    out = lazy.generate(PROMPT, on_token=seen.append, **kw)
    assert seen == out.new_tokens
    assert list(lazy.stream(PROMPT, **kw)) == out.new_tokens


def test_stream_raises_bad_input_in_the_caller(lazy, baseline):
    with pytest.raises(ValueError, match="prompt is empty"):
        list(lazy.stream([], max_new_tokens=4))
    assert_still_works(lazy, baseline)
