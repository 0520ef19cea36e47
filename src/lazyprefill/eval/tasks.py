"""Offline long-context tasks built, with a fixed seed, from text nobody in this project wrote.

Every sample is exactly `length` prompt tokens, so each method sees the same work at a given length.
Sources ship with Python itself: the standard library's `.py` files (`code`) and the Python Language
Reference topics in `pydoc_data.topics` (`recall`, `fidelity`). `passkey` is the classic synthetic
retrieval prompt (Mohtashami & Jaggi 2023).
"""

from __future__ import annotations

import random
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

TASKS: tuple[str, ...] = ("code", "recall", "passkey", "fidelity")
# Seeds of the two splits (MEASURE.md): presets and tuned schedules are chosen on `calibration` and
# reported on `evaluation`; `lazyprefill tune` drops any calibration prompt the evaluation split also has.
SPLITS: dict[str, int] = {"evaluation": 0, "calibration": 1}

CODE_MAX_NEW = 24  # one line of code (generation stops at its newline)
PASSKEY_MAX_NEW = 6  # a 5-digit key is one token per digit, plus perhaps a space
FIDELITY_MAX_NEW = 64
RECALL_PREFIX_WORDS = 6  # the restarted sentence begins with this many of its words
RECALL_TARGET_WORDS = 5  # ...and the model must continue with up to this many more


@dataclass(frozen=True)
class Sample:
    """One prompt with what a correct answer is. `reference` is text (code, recall) or the key (passkey)."""

    task: str
    index: int
    length: int
    prompt_ids: list[int]
    reference: str
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


def build_all(task_names, tokenizer, lengths, n: int, seed: int = 0) -> list[Sample]:
    """Every task's samples at every length, interleaved (sample 0 of each task, then sample 1, ...) so a
    run stopped early still has about as many samples of each task."""
    per_task = [build(t, tokenizer, length, n, seed) for length in lengths for t in task_names]
    return [group[i] for i in range(n) for group in per_task]


def build(task: str, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """`n` samples of `task` at `length` prompt tokens; the same arguments always give the same samples."""
    builders: dict[str, Callable] = {
        "code": build_code, "recall": build_recall, "passkey": build_passkey, "fidelity": build_fidelity,
    }
    if task not in builders:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if length < 128:
        raise ValueError(f"length {length} is too short for a long-context task: use at least 128 tokens")
    return builders[task](tokenizer, length, n, random.Random(f"{task}:{length}:{seed}"))


# ------------------------------------------------------------------------------------------ code
@cache
def stdlib_files(min_chars: int) -> tuple[Path, ...]:
    """The installed standard library's Python files (tests and vendored code excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "idlelib", "lib2to3", "encodings", "__pycache__")
    files = [p for p in root.rglob("*.py") if not any(part in skip or part.startswith("test") for part in p.parts)]
    return tuple(sorted(p for p in files if p.stat().st_size >= min_chars))


def build_code(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """LCC-style next-line completion: the file up to a line, cut from the left to `length` tokens.

    The prompt ends at the last token boundary between the target line's start and its first
    non-blank character (BPE merges the newline with most of the indentation), so the model writes
    the rest of the indentation and the line's code; scoring compares stripped lines. Target lines
    have at least 12 characters and no comment, backtick or `//` (LongBench's `code_sim_score` skips
    such lines in the prediction).
    """
    files = stdlib_files(min_chars=length * 3)
    samples: list[Sample] = []
    while len(samples) < n:
        path = rng.choice(files)
        text = path.read_text(encoding="utf-8", errors="replace")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, ends = enc["input_ids"], {end: i for i, (_, end) in enumerate(enc["offset_mapping"])}
        candidates = []
        for m in re.finditer(r"^([ \t]*)(\S[^\n]*)$", text, flags=re.M):
            line = m.group(2).rstrip()
            # the prompt is ids[: cut + 1], ending at the last token boundary within the indentation
            cut = next((ends[e] for e in range(m.start(2), m.start(1) - 1, -1) if e in ends), None)
            if cut is None or cut + 1 < length or len(line) < 12 or any(c in line for c in ("#", "`", "//")):
                continue
            candidates.append((cut, line))
        if not candidates:
            continue
        cut, line = rng.choice(candidates)
        rel = str(path.relative_to(Path(sysconfig.get_paths()["stdlib"])))
        samples.append(Sample("code", len(samples), length, ids[cut + 1 - length: cut + 1], line, CODE_MAX_NEW,
                              {"file": rel, "line": line}))
    return samples


# ---------------------------------------------------------------------------------------- recall
@cache
def reference_manual() -> str:
    """The Python Language Reference topics that ship with Python (`pydoc_data.topics`), in name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def build_recall(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """A sentence from inside a real document is begun again at the end; the model must continue it.

    The document is a `length`-token window of the Python Language Reference. A prose sentence (at
    least 14 words, letters and punctuation only, possibly wrapped over lines) sits at a random depth
    in [0.05, 0.9] of the window; its first RECALL_PREFIX_WORDS words occur nowhere else in the window,
    so the continuation is determined (compared with whitespace collapsed). The prompt is the window, a
    blank line, and those words; the reference is the sentence's next words (up to RECALL_TARGET_WORDS,
    ending at the sentence's end).
    """
    text = reference_manual()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    starts = {start: i for i, (start, _) in enumerate(offsets)}
    sentences = [
        m for m in re.finditer(r"(?<=[.!?]\s)([A-Z][A-Za-z ,;'()\n-]+[.!?])(?=\s)", text)
        if len(m.group(1).split()) >= RECALL_PREFIX_WORDS + 8 and "\n\n" not in m.group(1)
    ]
    samples: list[Sample] = []
    while len(samples) < n:
        m = rng.choice(sentences)
        words = m.group(1).split()
        prefix = " ".join(words[:RECALL_PREFIX_WORDS])
        target = " ".join(words[RECALL_PREFIX_WORDS: RECALL_PREFIX_WORDS + RECALL_TARGET_WORDS])
        tail = tokenizer("\n\n" + prefix, add_special_tokens=False)["input_ids"]
        body = length - len(tail)
        first = starts.get(m.start(1))
        depth = rng.uniform(0.05, 0.9)
        if first is None:
            continue
        lo = first - round(depth * body)
        window = ids[lo: lo + body] if lo >= 0 else []
        if len(window) < body or offsets[lo + body - 1][1] < m.end(1):
            continue
        window_text = " ".join(text[offsets[lo][0]: offsets[lo + body - 1][1]].split())
        if window_text.count(prefix) != 1:
            continue
        max_new = len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 2
        samples.append(Sample("recall", len(samples), length, window + tail, target, max_new,
                              {"depth": round(depth, 3), "prefix": prefix}))
    return samples


# --------------------------------------------------------------------------------------- passkey
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_passkey(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """A random 5-digit key hidden at depth 0, 0.25, 0.5, 0.75 or 1 (cycled) of repeated filler."""
    def tok(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    intro, question = tok(PASSKEY_INTRO), tok(PASSKEY_QUESTION)
    filler = tok(PASSKEY_FILLER * (length // 8))
    samples: list[Sample] = []
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        needle = tok(PASSKEY_NEEDLE.format(key=key))
        room = length - len(intro) - len(needle) - len(question)
        depth = PASSKEY_DEPTHS[i % len(PASSKEY_DEPTHS)]
        before = round(depth * room)
        prompt = intro + filler[:before] + needle + filler[: room - before] + question
        samples.append(Sample("passkey", i, length, prompt, key, PASSKEY_MAX_NEW, {"depth": depth}))
    return samples


# -------------------------------------------------------------------------------------- fidelity
def build_fidelity(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """Random `length`-token windows of the Python Language Reference; scored only against dense."""
    ids = tokenizer(reference_manual(), add_special_tokens=False)["input_ids"]
    starts = sorted(rng.sample(range(len(ids) - length), n))
    return [Sample("fidelity", i, length, ids[s: s + length], "", FIDELITY_MAX_NEW, {"start": s})
            for i, s in enumerate(starts)]
