"""Causal attention in buckets of rows (attention.causal_attention): SDPA's cuDNN kernel builds a graph per sequence
length (45-70 ms each on an H100), so on CUDA the rows are padded to a multiple of CAUSAL_ROWS_STEP. The real rows
must get exactly what they get unpadded, and the call must see only bucketed lengths."""

import pytest
import torch
from helpers import prompt_ids, tiny_model

import lazyprefill as lp
from lazyprefill import attention


@pytest.mark.parametrize("rows", [1, 255, 300, 512])
def test_bucketed_causal_attention_equals_the_exact_call(rows, monkeypatch):
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(2, rows, 4, 16, generator=g).transpose(1, 2)  # [B, H, W, dh] in the engine's rows-major layout
    k, v = (torch.randn(2, rows, 2, 16, generator=g).transpose(1, 2) for _ in range(2))  # GQA: 2 K/V heads
    exact = attention.causal_attention(q, k, v, 0.25, bucket=False)
    seen = []
    sdpa = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, *a, **kw: seen.append(q.shape[2]) or sdpa(q, *a, **kw))
    got = attention.prefill_attention(q, k, v, torch.arange(rows).expand(2, rows), None, rows, 0.25, bucket=True)
    assert seen == [-(-rows // attention.CAUSAL_ROWS_STEP) * attention.CAUSAL_ROWS_STEP]
    assert got.shape == exact.shape == (2, 4, rows, 16)
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-5)


def test_rows_are_bucketed_only_on_cuda_by_default(monkeypatch):
    """On the CPU SDPA builds nothing per length, and padding would only add work."""
    q, k, v = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    seen = []
    sdpa = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, *a, **kw: seen.append(q.shape[2]) or sdpa(q, *a, **kw))
    attention.prefill_attention(q, k, v, torch.arange(100)[None], None, 100, 0.3)
    assert seen == [100]


def test_a_pruned_batch_prefilled_in_buckets_answers_as_without(monkeypatch):
    """The engine's prefill through bucketed rows (forced on the CPU): two prompts of different lengths, pruned, so
    that the rows are padded per sequence, then to a bucket, at every row count the layers meet."""
    model = tiny_model("llama_gqa_rope3")
    prompts = [prompt_ids(70, seed=1), prompt_ids(45, seed=2)]
    run = lambda: lp.LazyLLM(model, "0:0.5,2:0.5+min=0").generate(  # noqa: E731
        prompts, max_new_tokens=4, eos_token_id=[], return_logits=True)
    want = run()
    exact, widths = attention.causal_attention, []

    def bucketed(q, k, v, scaling, _bucket):
        widths.append(q.shape[2])
        return exact(q, k, v, scaling, True)

    monkeypatch.setattr(attention, "causal_attention", bucketed)
    got = run()
    assert {70, 35} <= set(widths)  # the prompts' rows, and those that the first pruning layer keeps
    for g, w in zip(got, want, strict=True):
        assert g.new_tokens == w.new_tokens
        torch.testing.assert_close(torch.stack(g.logits), torch.stack(w.logits), atol=1e-5, rtol=1e-5)
