"""RULER's synthetic task families: construction (exact length, determinism, answers really in the prompt),
the string_match_all metric, and their names through EvalConfig and `lazyprefill eval`."""

from __future__ import annotations

import re
from collections import Counter
from itertools import pairwise

import pytest
from typer.testing import CliRunner

from lazyprefill.cli import app
from lazyprefill.eval import EvalConfig, complete_records, metrics, tasks
from lazyprefill.eval.runner import task_score

NIAH_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


@pytest.fixture(scope="module")
def tokenizer():
    from lazyprefill.models import load_model

    return load_model("smollm2")[1]


def context_of(tokenizer, sample: tasks.Sample, intro: str) -> str:
    """The decoded prompt between the task's instruction and its question."""
    text = tokenizer.decode(sample.prompt_ids)
    assert text.startswith(intro)
    return text[len(intro): text.rindex("\nQuestion:" if "\nQuestion:" in text else "\nWhat ")]


def find(ids: list[int], part: list[int]) -> int:
    """Where token list `part` starts in `ids`; -1 if absent."""
    return next((i for i in range(len(ids) - len(part) + 1) if ids[i: i + len(part)] == part), -1)


# ---------------------------------------------------------------------------------------- the metric
def test_string_match_all_scores_the_fraction_of_items_found():
    items = ["4821937", "1234567", "5550001", "9000009"]
    assert metrics.string_match_all(" 4821937, 1234567, 5550001 and 9000009.", items) == 1.0
    assert metrics.string_match_all(" 9000009 and 4821937", items) == 0.5  # any order
    assert metrics.string_match_all(" 48219370, 123456, 7777777", items) == 0.0  # no whole number matches
    assert metrics.string_match_all(" The Grammar, SPAM", ["grammar", "spam", "eggs"]) == pytest.approx(2 / 3)
    assert metrics.string_match_all(" format, formal", ["form"]) == 0.0  # whole words only
    with pytest.raises(ValueError, match="at least one"):
        metrics.string_match_all("x", [])


def test_task_score_uses_string_match_all_for_every_ruler_task():
    for task in tasks.RULER_TASKS:
        sample = tasks.Sample(task, 0, 256, [1, 2], "alpha\nbeta\ngamma\ndelta", 20)
        assert task_score(sample, " Alpha, beta, gamma, delta", [], []) == 1.0
        assert task_score(sample, " alpha and gamma", [], []) == 0.5
        assert task_score(sample, " epsilon", [], []) == 0.0


# --------------------------------------------------------------------------------------- the tasks
@pytest.mark.parametrize("task", tasks.RULER_TASKS)
def test_ruler_tasks_are_exact_length_deterministic_and_seeded(tokenizer, task):
    for length in (300, 1000):
        first = tasks.build(task, tokenizer, length, 5, seed=3)
        assert [len(s.prompt_ids) for s in first] == [length] * 5
        assert first == tasks.build(task, tokenizer, length, 5, seed=3)
        other = tasks.build(task, tokenizer, length, 5, seed=4)
        assert all(a.prompt_ids != b.prompt_ids and a.reference != b.reference for a, b in zip(first, other))
        assert len({s.reference for s in first}) == 5  # samples differ from each other too
        for s in first:
            answer = s.reference.split(tasks.LIST_SEPARATOR)
            assert len(tokenizer(" " + ", ".join(answer), add_special_tokens=False)["input_ids"]) < s.max_new_tokens


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_needles_are_in_the_haystack_once_at_their_depths(tokenizer, task):
    spec = tasks.NIAH[task]
    samples = tasks.build(task, tokenizer, 512, 5, seed=0)
    for s in samples:
        text = tokenizer.decode(s.prompt_ids)
        needles = s.meta["needles"]
        assert len(needles) == spec.keys * spec.values
        assert len({n["key"] for n in needles}) == spec.keys and len({n["value"] for n in needles}) == len(needles)
        for n in needles:
            needle = f"One of the special magic numbers for {n['key']} is: {n['value']}."
            assert text.count(needle) == 1
            assert re.search(r"(afterwards\.\n|[.!?]) " + re.escape(needle) + r"\s", text)  # between sentences
            assert text.count(n["value"]) == 1  # nowhere else, the question included
            assert re.fullmatch(r"[1-9]\d{6}", n["value"])
        asked = s.meta["asked"]
        assert len(asked) == spec.queries
        question = text[text.rindex("\nWhat "):]
        assert all(key in question for key in asked) and question.endswith("mentioned in the provided text " + (
            "is" if len(s.reference.split("\n")) == 1 else "are"))
        assert not any(n["key"] in question for n in needles if n["key"] not in asked)  # distractors are not asked
        assert s.reference.split("\n") == [n["value"] for n in needles if n["key"] in asked]
        assert metrics.string_match_all(" " + ", ".join(n["value"] for n in needles), s.reference.split("\n")) == 1.0
        # sentence ends are at most NIAH_MAX_GAP of the window apart; depth 1 goes to the last one
        assert all(abs(needle_depth(tokenizer, s, k) - n["depth"]) < 0.15 for k, n in enumerate(needles))
    assert [s.meta["needles"][0]["depth"] for s in samples] == list(tasks.NEEDLE_DEPTHS)


def needle_depth(tokenizer, sample: tasks.Sample, k: int) -> float:
    """Where needle `k` of `sample` sits in its haystack, in [0, 1], found from the prompt's tokens."""
    needles = [tokenizer(tasks.NIAH_NEEDLE.format(**n), add_special_tokens=False)["input_ids"]
               for n in sample.meta["needles"]]
    intro = len(tokenizer(tasks.NIAH_INTRO, add_special_tokens=False)["input_ids"])
    question = len(sample.prompt_ids) - find(sample.prompt_ids, tokenizer("\nWhat", add_special_tokens=False)[
        "input_ids"])
    room = len(sample.prompt_ids) - intro - question - sum(map(len, needles))
    at = find(sample.prompt_ids, needles[k])
    before = sum(len(ids) for ids in needles if 0 <= find(sample.prompt_ids, ids) < at)
    return (at - intro - before) / room


def test_multikey_asks_one_key_among_four_and_multivalue_wants_all_values(tokenizer):
    for s in tasks.build("niah_multikey", tokenizer, 512, 3):
        assert len({n["key"] for n in s.meta["needles"]}) == 4 and len(s.meta["asked"]) == 1
        assert len(s.reference.split("\n")) == 1
    for s in tasks.build("niah_multivalue", tokenizer, 512, 3):
        assert len({n["key"] for n in s.meta["needles"]}) == 1 and len(s.reference.split("\n")) == 4


def test_variable_tracking_chain_is_in_order_among_the_noise(tokenizer):
    for s in tasks.build("vt", tokenizer, 512, 5, seed=2):
        names, value = s.reference.split("\n"), s.meta["value"]
        assert names == s.meta["chain"] and len(names) == tasks.VT_HOPS + 1
        text = tokenizer.decode(s.prompt_ids)
        lines = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
        places = [text.index(line) for line in lines]
        assert places == sorted(places) and all(text.count(line) == 1 for line in lines)
        assert text.count("VAR ") == len(lines) * 2 - 1  # no other assignment
        noise = re.sub(r" ?VAR [A-Z]{5} = (VAR [A-Z]{5}|\d{5})\.", "", context_of(tokenizer, s, tasks.VT_INTRO))
        assert set(re.findall(r"[A-Za-z]+", noise)) <= set(re.findall(r"[A-Za-z]+", tasks.PASSKEY_FILLER))
        assert text.endswith(f"{len(names)} variables are assigned the value {value}, they are:")


def test_common_words_are_the_ten_most_frequent_of_a_numbered_list(tokenizer):
    for length in (512, 4096):
        for s in tasks.build("cwe", tokenizer, length, 3, seed=1):
            context = context_of(tokenizer, s, tasks.CWE_INTRO)
            items = re.findall(r" (\d+)\. ([a-z]+)(?= \d|$)", context)
            assert [int(k) for k, _ in items] == list(range(1, len(items) + 1))
            counts = Counter(word for _, word in items)
            common = s.reference.split("\n")
            assert len(common) == tasks.CWE_COMMON and set(common) <= set(tasks.manual_words())
            least_common = min(counts[w] for w in common)
            assert least_common == s.meta["repeats"][0] >= 2
            assert max(c for w, c in counts.items() if w not in common) < least_common
    assert s.meta["repeats"] == [tasks.CWE_MOST, 3]  # RULER's counts once the list is long enough


def test_frequent_words_are_the_three_most_frequent_zipf_words(tokenizer):
    for s in tasks.build("fwe", tokenizer, 512, 5, seed=1):
        words = context_of(tokenizer, s, tasks.FWE_INTRO).split()
        counts = Counter(words[:-1])  # the last word may be cut
        ranked = counts.most_common()
        assert [w for w, _ in ranked[: tasks.FWE_TOP]] == s.reference.split("\n")
        assert ranked[tasks.FWE_TOP - 1][1] - ranked[tasks.FWE_TOP][1] >= tasks.FWE_MARGIN
        assert ranked[0][1] > 2 * ranked[1][1] > 0  # Zipf with exponent 2: the first about 4 times the second
        assert all(re.fullmatch(r"([bdfgklmnprstvz][aeiou]){3}", w) for w in words[:-1])


# ------------------------------------------------------------------------------------------ errors
def test_bad_task_names_and_lengths_are_refused_clearly(tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'niah'.*niah_single"):
        tasks.build("niah", tokenizer, 512, 1)
    with pytest.raises(ValueError, match="too short"):
        tasks.build("vt", tokenizer, 100, 1)
    with pytest.raises(ValueError, match=r"too short for niah_multiquery: .* use at least \d+"):
        tasks.build("niah_multiquery", tokenizer, 128, 1)
    with pytest.raises(ValueError, match=r"too short for cwe: .* use at least \d+"):
        tasks.build("cwe", tokenizer, 128, 1)
    assert EvalConfig(tasks=tasks.RULER_TASKS).tasks == tasks.RULER_TASKS
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=("vt", "niah"))


def test_eval_cli_runs_ruler_tasks(tmp_path):
    out = tmp_path / "eval"
    refused = CliRunner().invoke(app, ["eval", "--tasks", "vt,niah", "--out", str(out)])
    assert refused.exit_code == 2 and "unknown task" in refused.output
    result = CliRunner().invoke(app, [
        "eval", "--model", "smollm2", "--tasks", "niah_single,fwe", "--samples", "1", "--lengths", "256",
        "--schedules", "none", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    records = complete_records(out, n_methods=1)
    assert [(r["task"], r["method"]) for r in records] == [("niah_single", "dense"), ("fwe", "dense")]
    for r in records:
        assert r["score"] == r["reference_score"] and r["score"] in (0.0, 1 / 3, 2 / 3, 1.0)
