"""Offline long-context tasks built, with a fixed seed, from text nobody in this project wrote.

Every sample is exactly `length` prompt tokens, so each method sees the same work at a given length.
Sources ship with Python itself: the standard library's `.py` files (`code`) and the Python Language
Reference topics in `pydoc_data.topics` (`recall`, `fidelity`). `passkey` is the classic synthetic
retrieval prompt (Mohtashami & Jaggi 2023).

RULER's synthetic families (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv 2404.06654) are generated here from the paper's task definitions, not its code:
- `niah_single`, `niah_multikey`, `niah_multivalue`, `niah_multiquery`: needles "One of the special magic
  numbers for {key} is: {value}." in a haystack of the Language Reference (RULER uses essays).
- `vt`: variable tracking, one chain of assignments "VAR X = 12345", "VAR Y = VAR X", ... among noise sentences.
- `cwe`: common words extraction, a numbered list of words from the Language Reference.
- `fwe`: frequent words extraction, synthetic words drawn from a Zipf distribution.
Their references list the answer's items, one per line (LIST_SEPARATOR); `metrics.string_match_all` scores them.
"""

from __future__ import annotations

import math
import random
import re
import string
import sysconfig
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache, partial
from itertools import pairwise
from pathlib import Path

RULER_TASKS: tuple[str, ...] = (
    "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
)
TASKS: tuple[str, ...] = ("code", "recall", "passkey", "fidelity", *RULER_TASKS)
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
    """One prompt with what a correct answer is. `reference` is text (code, recall), the key (passkey), or
    the items a RULER task's answer must contain, one per line (LIST_SEPARATOR)."""

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
        **{name: partial(build_niah, task=name) for name in NIAH}, "vt": build_vt, "cwe": build_cwe, "fwe": build_fwe,
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


# ------------------------------------------------------------------------------------------- RULER
LIST_SEPARATOR = "\n"  # between the items of a RULER sample's reference
ANSWER_SLACK = 3  # answer tokens per item beyond the item's own: room for a separator or a list number
NEEDLE_DEPTHS = PASSKEY_DEPTHS  # the first needle's depth, cycled over samples; the others are spread from it


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _room(task: str, length: int, fixed: int, least: int) -> int:
    """Tokens left for the context once `fixed` tokens (instruction, question, needles) are placed.

    Fewer than `least` would leave no real context to search, so that length is refused."""
    room = length - fixed
    if room < least:
        raise ValueError(f"length {length} is too short for {task}: its instruction, question and needles take "
                         f"{fixed} tokens; use at least {fixed + least}")
    return room


def _listed(tokenizer, task: str, index: int, length: int, prompt: list[int], answer: list[str], meta: dict) -> Sample:
    """A sample whose reference is `answer`'s items, one per line, with room to generate all of them."""
    answer_tokens = len(_ids(tokenizer, " " + ", ".join(answer)))
    return Sample(task, index, length, prompt, LIST_SEPARATOR.join(answer),
                  answer_tokens + ANSWER_SLACK * len(answer), meta)


def _cut_tail(items: Iterator[list[int]], residual: int) -> list[int]:
    """Token ids of `items` taken in turn until there are `residual`, the last one cut.

    List contexts end with such a tail to hit the prompt length exactly; its items are words used nowhere
    else in the list, so cutting one changes no word's count."""
    out: list[int] = []
    while len(out) < residual:
        out += next(items)
    return out[:residual]


@cache
def manual_words() -> tuple[str, ...]:
    """The distinct lowercase words of at least 4 letters in the Language Reference, sorted: real words for
    needle keys and word lists."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,}\b", reference_manual()))))


@dataclass(frozen=True)
class Haystack:
    """Filler text as token ids, with the tokens that follow a sentence's end: RULER puts needles between
    sentences, not inside them."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    starts: list[int]  # sorted indices of the tokens that follow a sentence's end

    @classmethod
    def of(cls, tokenizer, text: str) -> Haystack:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        starts = [i for i in range(1, len(offsets)) if cls._after_sentence(text, offsets[i - 1][1])]
        return cls(text, enc["input_ids"], offsets, starts)

    @staticmethod
    def _after_sentence(text: str, end: int) -> bool:
        """Whether a sentence ended just before `end`: "." "!" or "?" then a space or a line break (a needle
        there reads as the next sentence; at the start of a line it would run into the line's text)."""
        return text[end - 1] in ".!?" and text[end: end + 1].isspace()

    def largest_gap(self, start: int, size: int) -> int:
        """The most tokens between sentence ends (or the window's edges) in tokens [start, start + size)."""
        ends = self.starts[bisect_left(self.starts, start + 1): bisect_right(self.starts, start + size - 1)]
        edges = [start, *ends, start + size]
        return max(b - a for a, b in pairwise(edges))

    def window_text(self, start: int, size: int) -> str:
        """The text of tokens [start, start + size)."""
        return self.text[self.offsets[start][0]: self.offsets[start + size - 1][1]]

    def with_needles(self, start: int, room: int, needles: list[tuple[float, list[int]]]) -> list[int]:
        """`room` tokens from `start`, each needle (depth in [0, 1], ids) inserted after the sentence end
        nearest its depth; needles at the same place keep their order."""
        window = self.ids[start: start + room]
        # the window's start follows a sentence's end (or is the text's start); its end may not
        ends = self.starts[bisect_left(self.starts, start + 1): bisect_right(self.starts, start + room)]
        places = [0, *(i - start for i in ends)]
        at = sorted((min(places, key=lambda p: abs(p - depth * room)), k) for k, (depth, _) in enumerate(needles))
        out, last = [], 0
        for place, k in at:
            out += window[last:place] + needles[k][1]
            last = place
        return out + window[last:]


def _spread(first: float, k: int) -> list[float]:
    """`k` depths evenly spaced around [0, 1], starting at `first` (which may be 1.0)."""
    return [first] + [(first + j / k) % 1.0 for j in range(1, k)]


def _draw_numbers(rng: random.Random, k: int, digits: int, avoid: str) -> list[str]:
    """`k` distinct random `digits`-digit numbers, none of which occurs in `avoid` (the haystack's text)."""
    out: list[str] = []
    while len(out) < k:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in out and value not in avoid:
            out.append(value)
    return out


# ----------------------------------------------------------------------------- needle in a haystack
NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NIAH_NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_ONE = (
    "\nWhat is the special magic number for {keys} mentioned in the provided text? "
    "The special magic number for {keys} mentioned in the provided text is"
)
NIAH_ALL = (
    "\nWhat are all the special magic numbers for {keys} mentioned in the provided text? "
    "The special magic numbers for {keys} mentioned in the provided text are"
)
NIAH_DIGITS = 7
# Sentence ends in a haystack window are at most this far apart (a fraction of the window, or a few
# sentences' tokens in a short one), so a needle lands near its depth.
NIAH_MAX_GAP = (0.1, 48)
NIAH_WINDOW_TRIES = 1000
NIAH_KEY_LETTERS = 7  # keys are words this long: nouns, verbs and adjectives mostly, so a key reads as a name


@dataclass(frozen=True)
class Needles:
    """A needle-in-a-haystack variant, RULER's num_needle_k, num_needle_v and num_needle_q: `keys` keys
    in the haystack, `values` needles (each its own value) per key, and the first `queries` keys asked for."""

    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH: dict[str, Needles] = {
    "niah_single": Needles(),
    "niah_multikey": Needles(keys=4),  # three distractor keys with their own values
    "niah_multivalue": Needles(values=4),
    "niah_multiquery": Needles(keys=4, queries=4),
}


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _prose_window(haystack: Haystack, length: int, rng: random.Random) -> int:
    """A random window start after a sentence end, whose sentence ends are never far apart (prose, as RULER's
    essays, not a long grammar listing that would leave needles far from their depths)."""
    gap = max(NIAH_MAX_GAP[0] * length, NIAH_MAX_GAP[1])
    for _ in range(NIAH_WINDOW_TRIES):
        start = haystack.starts[rng.randrange(bisect_left(haystack.starts, len(haystack.ids) - length))]
        if haystack.largest_gap(start, length) <= gap:
            return start
    raise ValueError(f"no window of {length} tokens of the haystack has a sentence end every {gap:.0f} tokens")


def build_niah(tokenizer, length: int, n: int, rng: random.Random, task: str) -> list[Sample]:
    """Needles with 7-digit values in a window of the Language Reference (`_prose_window`); the question asks
    for some keys' values.

    Keys are long words of the Language Reference that neither the window nor the templates contain, values
    numbers the window does not contain, so each occurs only where it was put. The first needle (of the
    first key asked for) sits at depth 0, 0.25, 0.5, 0.75 or 1 (cycled over samples), the others evenly
    spaced after it, wrapping around; each goes after the nearest sentence end. `meta` has every needle's
    key, value and depth, and the keys asked.
    """
    spec, haystack = NIAH[task], Haystack.of(tokenizer, reference_manual())
    if len(haystack.ids) <= length:
        raise ValueError(f"length {length} is too long for {task}: its haystack has {len(haystack.ids)} tokens")
    intro = _ids(tokenizer, NIAH_INTRO)
    samples: list[Sample] = []
    for i in range(n):
        start = _prose_window(haystack, length, rng)
        seen = haystack.window_text(start, length)
        words = set(re.findall(r"[a-z]+", (seen + NIAH_INTRO + NIAH_NEEDLE + NIAH_ALL).lower()))
        keys = [w for w in rng.sample(manual_words(), len(manual_words()))
                if len(w) >= NIAH_KEY_LETTERS and w not in words][: spec.keys]
        values = _draw_numbers(rng, spec.keys * spec.values, NIAH_DIGITS, avoid=seen)
        needles = [(keys[j // spec.values], value) for j, value in enumerate(values)]
        depths = _spread(NEEDLE_DEPTHS[i % len(NEEDLE_DEPTHS)], len(needles))
        asked = keys[: spec.queries]
        answer = [value for key, value in needles if key in asked]
        question = _ids(tokenizer, (NIAH_ONE if len(answer) == 1 else NIAH_ALL).format(keys=_and(asked)))
        needle_ids = [_ids(tokenizer, NIAH_NEEDLE.format(key=key, value=value)) for key, value in needles]
        fixed = sum(map(len, needle_ids))
        room = _room(task, length, len(intro) + len(question) + fixed, least=fixed)
        context = haystack.with_needles(start, room, list(zip(depths, needle_ids)))
        meta = {"needles": [{"key": k, "value": v, "depth": d} for (k, v), d in zip(needles, depths)],
                "asked": asked, "start": start}
        samples.append(_listed(tokenizer, task, i, length, intro + context + question, answer, meta))
    return samples


# ------------------------------------------------------------------------------- variable tracking
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
VT_FIRST = " VAR {name} = {value}."
VT_NEXT = " VAR {name} = VAR {previous}."
VT_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: According to "
    "the chain of variable assignments in the text above, {count} variables are assigned the value {value}, they are:"
)
VT_HOPS = 4  # one chain: a variable set to the value, then 4 more, each set to the one before


def build_vt(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """One chain of VT_HOPS + 1 assignments of a 5-digit value among RULER's noise sentences (passkey's
    filler); the answer is every variable of the chain. Assignments sit at evenly spaced depths, in order,
    all shifted by 0, 1/4, ... 1 of a spacing (cycled over samples), each after the nearest sentence end."""
    noise = Haystack.of(tokenizer, PASSKEY_FILLER * (length // 8))
    intro = _ids(tokenizer, VT_INTRO)
    samples: list[Sample] = []
    for i in range(n):
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            names += [name] if name not in names else []
        value = _draw_numbers(rng, 1, 5, avoid="")[0]
        lines = [VT_FIRST.format(name=names[0], value=value)]
        lines += [VT_NEXT.format(name=b, previous=a) for a, b in pairwise(names)]
        statements = [_ids(tokenizer, line) for line in lines]
        shift = NEEDLE_DEPTHS[i % len(NEEDLE_DEPTHS)]
        depths = [(j + shift) / len(statements) for j in range(len(statements))]
        question = _ids(tokenizer, VT_QUESTION.format(value=value, count=len(names)))
        fixed = sum(map(len, statements))
        room = _room("vt", length, len(intro) + len(question) + fixed, least=fixed)
        context = noise.with_needles(0, room, list(zip(depths, statements)))
        meta = {"value": value, "chain": names, "depths": depths}
        samples.append(_listed(tokenizer, "vt", i, length, intro + context + question, names, meta))
    return samples


# ------------------------------------------------------------------------------ common words (cwe)
CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    "\nQuestion: What are the {count} most common words in the above list? "
    "Answer: The top {count} words that appear most often in the list are:"
)
CWE_COMMON = 10
CWE_MOST = 30  # RULER's: the common words appear 30 times each, the others 3 times
CWE_SPARE = 100  # vocabulary words kept for the list's tail


def _cwe_repeats(length: int, room: int, item_tokens: float) -> tuple[int, int]:
    """How often each common word and each other word appear.

    RULER's 30 and 3 fill only a 4K prompt; a shorter list gives its common words about two thirds of the
    items (at least twice each), the others once, so the common ones still stand out. A long list repeats
    the others more often when the vocabulary would not otherwise fill it."""
    items = int(room / item_tokens)
    common = min(CWE_MOST, items * 2 // (3 * CWE_COMMON))  # about two thirds of the list
    if common < 2:
        need = length - room + math.ceil(3 * CWE_COMMON * item_tokens)  # twice each is two thirds of these
        raise ValueError(f"length {length} is too short for cwe: its list holds about {items} words, too few for "
                         f"{CWE_COMMON} words to appear twice among others; use at least {need}")
    vocabulary = len(manual_words()) - CWE_COMMON - CWE_SPARE
    rare = max(1, common // 10, math.ceil((items - CWE_COMMON * common) / vocabulary))
    if rare >= common:
        raise ValueError(f"length {length} is too long for cwe: {len(manual_words())} words cannot fill its list")
    return common, rare


def _numbered(tok: Callable[[str], list[int]], words: list[str], first: int = 1) -> list[int]:
    """" 1. word 2. word ...", numbered from `first`, as token ids (each number and word tokenized alone)."""
    return [t for k, word in enumerate(words, first) for t in tok(f" {k}.") + tok(f" {word}")]


def _fill_list(tok: Callable[[str], list[int]], common: list[str], others: list[str], repeats: tuple[int, int],
               room: int) -> tuple[list[str], int]:
    """The common words `repeats[0]` times each, then as many of `others` `repeats[1]` times each as fit in
    `room` tokens once numbered; returns the (unshuffled) words and how many of `others` were used."""
    many, few = repeats
    words = [w for w in common for _ in range(many)]
    used = len(_numbered(tok, words))
    for taken, word in enumerate(others[:-CWE_SPARE]):
        cost = len(_numbered(tok, [word] * few, len(words) + 1))
        if used + cost > room:
            return words, taken
        words += [word] * few
        used += cost
    return words, len(others) - CWE_SPARE


def build_cwe(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """A numbered list of Language Reference words, shuffled, in which CWE_COMMON words appear far more
    often than the others (see `_cwe_repeats`); the answer is those words. The list ends with words that
    appear once, the last one cut to hit exactly `length` tokens."""
    tok = cache(lambda text: _ids(tokenizer, text))
    intro, question = tok(CWE_INTRO), tok(CWE_QUESTION.format(count=CWE_COMMON))
    room = _room("cwe", length, len(intro) + len(question), least=1)
    samples: list[Sample] = []
    for i in range(n):
        pool = rng.sample(manual_words(), len(manual_words()))
        common, others = pool[:CWE_COMMON], pool[CWE_COMMON:]
        item_tokens = len(_numbered(tok, others[:100], room // 8)) / 100
        repeats = _cwe_repeats(length, room, item_tokens)
        words, taken = _fill_list(tok, common, others, repeats, room)
        rng.shuffle(words)
        context = _numbered(tok, words)
        singles = (_numbered(tok, [w], len(words) + 1 + k) for k, w in enumerate(others[taken:]))
        context += _cut_tail(singles, room - len(context))
        meta = {"repeats": list(repeats), "items": len(words)}
        samples.append(_listed(tokenizer, "cwe", i, length, intro + context + question, common, meta))
    return samples


# ---------------------------------------------------------------------------- frequent words (fwe)
FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.\n"
)
FWE_QUESTION = (
    "\nQuestion: What are the three most frequently appeared words in the above coded text? "
    "Answer: According to the coded text above, the three most frequently appeared words are:"
)
FWE_ALPHA = 2.0  # Zipf exponent, RULER's
FWE_TOP = 3
FWE_MARGIN = 2  # the third word appears at least this many times more than the fourth: one clear answer


def _coded_words(rng: random.Random) -> Iterator[str]:
    """Distinct made-up words of three consonant-vowel syllables ("kobera"), in random order, without end."""
    seen: set[str] = set()
    while True:
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        if word not in seen:
            seen.add(word)
            yield word


def _zipf_text(tok: Callable[[str], list[int]], rng: random.Random, room: int) -> tuple[list[int], Counter]:
    """`room` tokens of coded words drawn from a Zipf distribution, and the count of each whole word.

    The text ends with words used nowhere else, the last one cut to fill `room` exactly."""
    fresh = _coded_words(rng)
    vocabulary = [next(fresh) for _ in range(room // 2)]
    weights = [1 / (rank + 1) ** FWE_ALPHA for rank in range(len(vocabulary))]
    ids: list[int] = []
    counts: Counter = Counter()
    for word in rng.choices(vocabulary, weights, k=room):
        if len(ids) + len(tok(f" {word}")) > room:
            break
        ids += tok(f" {word}")
        counts[word] += 1
    return ids + _cut_tail((tok(f" {w}") for w in fresh), room - len(ids)), counts


def build_fwe(tokenizer, length: int, n: int, rng: random.Random) -> list[Sample]:
    """Coded words drawn with Zipf's law (exponent FWE_ALPHA) over a fresh vocabulary per sample; the answer
    is the FWE_TOP most frequent. A draw whose third and fourth words are within FWE_MARGIN is drawn again."""
    tok = cache(lambda text: _ids(tokenizer, text))
    intro, question = tok(FWE_INTRO), tok(FWE_QUESTION)
    room = _room("fwe", length, len(intro) + len(question), least=1)
    samples: list[Sample] = []
    for i in range(n):
        while True:
            context, counts = _zipf_text(tok, rng, room)
            ranked = [c for _, c in counts.most_common(FWE_TOP + 1)] + [0] * (FWE_TOP + 1)
            if ranked[FWE_TOP - 1] - ranked[FWE_TOP] >= FWE_MARGIN:
                break
        answer = [word for word, _ in counts.most_common(FWE_TOP)]
        meta = {"counts": ranked[: FWE_TOP + 1], "words": len(counts)}
        samples.append(_listed(tokenizer, "fwe", i, length, intro + context + question, answer, meta))
    return samples
