"""Scores for one sample, and means with 95% confidence intervals over samples."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz import fuzz

Z95 = 1.959963984540054


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench's `code_sim_score`: edit similarity of the first generated code line, in [0, 1].

    As in LongBench, the predicted line is the first line (after leading newlines) without a backtick,
    `#` or `//`, and the similarity is the Indel ratio (`fuzz.ratio / 100`; rapidfuzz, unrounded).
    Ours: both lines are stripped, because our prompts end inside the target line's indentation.
    """
    line = next((x for x in prediction.lstrip("\n").split("\n") if not any(c in x for c in ("`", "#", "//"))), "")
    return fuzz.ratio(line.strip(), reference.strip()) / 100.0


def recall_exact(prediction: str, reference: str) -> float:
    """1.0 when the prediction's first words are exactly the reference's words (split on whitespace)."""
    words = reference.split()
    return float(prediction.split()[: len(words)] == words)


def passkey_correct(prediction: str, key: str) -> float:
    """1.0 when the first run of digits in the prediction is the key."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group() == key)


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's `string_match_all`: the fraction of the reference items found in the prediction, ignoring case.

    Ours: an item counts only as a whole word, so "form" is not found in "format", nor "1234567" in
    "12345678" (RULER tests substrings).
    """
    if not references:
        raise ValueError("string_match_all needs at least one reference item")
    found = [re.search(rf"(?<!\w){re.escape(item)}(?!\w)", prediction, flags=re.IGNORECASE) for item in references]
    return sum(m is not None for m in found) / len(references)


def first_token_agree(tokens: list[int], dense_tokens: list[int]) -> float:
    return float(bool(tokens) and bool(dense_tokens) and tokens[0] == dense_tokens[0])


def match_length(tokens: list[int], dense_tokens: list[int]) -> int:
    """How many greedy tokens, from the first, equal the dense model's."""
    n = 0
    for a, b in zip(tokens, dense_tokens):
        if a != b:
            break
        n += 1
    return n


def kl_divergence(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(dense || method) of the next-token distributions, in nats. dense_logits, logits: [vocab]."""
    p_log = torch.log_softmax(dense_logits.float(), -1)
    q_log = torch.log_softmax(logits.float().to(p_log.device), -1)  # the reference is kept on the CPU
    return float((p_log.exp() * (p_log - q_log)).sum().clamp_min(0.0))


@dataclass(frozen=True)
class Interval:
    """A mean over `n` samples with its 95% confidence interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi], "n": self.n}


def mean_ci(values: list[float] | np.ndarray, seed: int = 0, resamples: int = 4000) -> Interval:
    """Mean with a 95% interval: Wilson's score interval for 0/1 scores, else a percentile bootstrap.

    Wilson stays honest at 0% and 100% correct (a bootstrap would claim zero width there).
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if np.isin(x, (0.0, 1.0)).all():
        centre = (mean + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
        return Interval(mean, centre - half, centre + half, n)
    means = np.random.default_rng(seed).choice(x, size=(resamples, n), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(mean, float(lo), float(hi), n)


def paired_diff_ci(values: list[float], dense: list[float], seed: int = 0, resamples: int = 4000) -> Interval:
    """Mean of (method - dense) over the same samples, 95% percentile-bootstrap interval.

    Pairing removes the between-sample spread, so this is far tighter than comparing two means.
    """
    d = np.asarray(values, dtype=np.float64) - np.asarray(dense, dtype=np.float64)
    if d.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if not d.any():
        return Interval(0.0, 0.0, 0.0, d.size)
    means = np.random.default_rng(seed).choice(d, size=(resamples, d.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Interval(float(d.mean()), float(lo), float(hi), d.size)
