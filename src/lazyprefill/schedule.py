"""Pruning schedules: which layers prune, how much each keeps, and which scorer ranks the tokens."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .scoring import ALIASES, SCORERS, Last, Scorer, parse_scorer, scorer_help
from .sparse import Sparse, parse_sparse


@dataclass(frozen=True)
class Preset:
    """A depth-relative schedule: `keep` maps a fraction of depth to a keep ratio, so one name fits any size."""

    keep: dict[float, float]
    scorer: str = "last"
    sparse: str | None = None  # block-sparse prefill attention (sparse.py), e.g. "sparse(top=0.05)"
    min_prompt_tokens: int | None = None  # Schedule.min_prompt_tokens: None, the device's threshold


# Ordered by speed. `balanced` was chosen by `lazyprefill tune` on the calibration split (SmolLM2-135M,
# 512 tokens, 16 samples per task, target: the 95% bound of the relative loss within 1% on code, recall
# and passkey): the fastest candidate that passed, 1.27x ideal prefill speedup (`last` and `protect`
# tied; `last` is the simpler rule). On the evaluation split (24-32 samples per task) it is the most
# accurate schedule measured but its 1% promise is NOT confirmed: code +0.021, passkey 0, recall -0.033
# (one sample net of 30; relative loss 5.9%, 95% bound 23.5%); at 1K tokens (60 per task) passkey 60/60 and
# code +0.009 (bound 3.6%); results/README.md. No faster schedule
# passed the 5% target on calibration, so the general presets have no `fast`. Both `balanced` presets bound
# revivals (scoring.Revive, 8 rows a step after the pruning layer): on SmolLM2 at 512 tokens and Gemma 3 at 2K the
# bound scored as the unbounded rule (results/smollm2-cpu-512-revive, results/gemma3-270m-cpu-2048-revive), and it
# takes the revival burst out of decoding, so that no step costs much more than a dense one and a step's shape is
# known to the host (benchmarks/NOTES.md, "The revival bound as the default").
# `paper` is Figure 4 of the paper: prune at ~30%, ~60% and ~90% of depth, dropping 30% of the current
# candidates each time, ranked by the last token's attention.
# `long` is for long prompts (issue 24): half the candidates go at ~30% and again at ~60% of depth, and from 16K
# tokens on the full-attention layers from layer 2 attend block-sparsely (sparse.py), the pruned ones included. On an
# H200 (llama3-8b, random bf16) it measured 1.82x TTFT at 8K, 2.29x at 32K, 2.86x at 64K and 3.81x at 128K (a median
# over rounds that partly overlapped other work; 3.9x in those that did not: benchmarks/results/long/long-h200.md;
# 1.70x-3.81x on an H100, long-h100.md). Its accuracy is measured through Gemma 3's `long` (results/README.md): at
# 16K-32K it keeps passkey, recall, niah_single and the multi-query needles and loses multi-key ones (32K: -0.080);
# at 2K (RULER's needles, results/gemma3-270m-cpu-2048-ruler) it loses retrieval as the old `balanced` did.
PRESETS: dict[str, Preset] = {
    "balanced": Preset({0.67: 0.3}, "revive(rows=8, of=last)"),
    "paper": Preset({0.3: 0.7, 0.6: 0.7, 0.9: 0.7}),
    "long": Preset({0.3: 0.5, 0.6: 0.5}, "revive(rows=8, of=last)", "sparse(min_tokens=16384)"),
}
# Gemma 3 (its adapter's presets; it prunes only at its full-attention layers, 5 and 11 of 18 on the 270M):
# chosen by `lazyprefill tune` on gemma3-270m's calibration split (4K and 8K tokens, 15 samples per task and
# length, scorers last / pool(window) / protect, 45 candidates), reported on the evaluation split (60 samples
# per task at 2K, 4K and 8K; results/README.md, "Gemma 3 270M"). `balanced`: the fastest candidate whose 95%
# bound of the relative loss was within 1% on calibration, 1.6x ideal; on evaluation its mean is within 1% of
# dense on 8 of the 9 task-length cells (code at 4K: -2.7%), the bounds are 0-11%. `fast`: the fastest within
# 5% on calibration, 2.0x ideal; on evaluation its mean is within 1.4% everywhere, the bounds 0-7.4%.
# `paper` maps onto layers 5 and 11 (1.5x ideal) and holds accuracy on this model too.
# `balanced` then lost key-value retrieval on RULER's needles, which no preset was tuned on: at 2K, 60 samples each,
# niah_multikey -0.067 on the calibration split and -0.067 on evaluation (results/README.md, "Needle retrieval").
# So it became slower but safer (issue 24, target 5): it prunes once, at ~60% of depth (layer 11 of the 270M), the
# fastest candidate within 1% of dense on the calibration split's niah_multikey at 2K (60 samples: 0.583 = dense;
# layer 5 at 0.7 lost 4) and on passkey, recall and code at 4K/8K (tune's search, `last` scorer); 1.22x ideal
# against the old 1.56x (`revive(rows=8, of=pool(k=7, of=window(w=16))):5:0.5` still runs by that spec). On the
# evaluation split at 2K it keeps niah_single (0.900 = dense) and loses 2 of 60 niah_multikey answers (-0.033).
# Below 8K tokens it now runs dense (issue 24, target 5: slower but safe). On the GPU (fp32, evaluation split, 100
# samples each, results/gemma3-270m-gpu-{2048,4096,8192}-multikey-default) it lost niah_multikey answers at 2K (2 of
# 100; 1 still with 0.7 or 0.85 kept) and scored as dense on every sample at 4K and 8K (and on 8K's
# niah_multivalue), but on the CPU at 4K it lost 2 of 30 (results/gemma3-270m-cpu-4096-needles-default): no
# schedule at layer 11 kept every answer below 8K on both devices. At 8K it scored as dense on the CPU too (20
# samples, results/gemma3-270m-cpu-8192-multikey-default).
GEMMA3_PRESETS: dict[str, Preset] = {
    "balanced": Preset({0.6: 0.5}, "revive(rows=8, of=pool(k=7, of=window(w=16)))", min_prompt_tokens=8192),
    "fast": Preset({0.3: 0.3}, "protect(sink=4, recent=16, of=pool(k=7, of=window(w=16)))"),
    "paper": PRESETS["paper"],
    # Gemma 3's `long` prunes as the general one but attends densely: at 16K (GPU fp32, 60 samples,
    # results/gemma3-270m-gpu-16384-parts) the block-sparse attention alone lost 3 of 60 niah_multikey answers where
    # the pruning lost 1, for 1.30x ideal against pruning's 1.90x (its only full-attention layers are 5, 11 and 17)
    "long": Preset({0.3: 0.5, 0.6: 0.5}, "revive(rows=8, of=pool(k=7, of=window(w=16)))"),
}
DENSE_NAMES = ("dense", "none")
# Below these prompt lengths a schedule runs dense unless it says otherwise (Schedule.min_prompt_tokens), so that no
# prompt gets a slower first token than dense (benchmarks/results/long/short*.md). H200, llama3-8b: `balanced` is
# 4-5% slower than dense at 512 and 1K tokens (host work per layer outweighs what pruning saves) and 15% faster at
# 2K. CPU, SmolLM2-135M: pruning pays from 128 tokens on.
MIN_PROMPT_TOKENS: dict[str, int] = {"cuda": 2048, "cpu": 0}
# The default of LazyLLM and the CLI: the preset that keeps accuracy, not the paper's lossy one.
DEFAULT_PRESET = "balanced"
SCHEDULE_FILE_FORMAT = "lazyprefill-schedule/1"


class FileRefused(ValueError):
    """A schedule that looks like a file's path, given where files are not read (`parse_schedule(files=False)`).
    Raised before anything touches the disk, with one message for every path, so that it says nothing of what
    exists there."""


def looks_like_path(text: str) -> bool:
    """Whether a schedule string reads as a file's path (a separator, a leading '.' or '~', or .json at the end);
    no spec that `parse_schedule` reads without files does."""
    text = text.strip()
    return "/" in text or "\\" in text or text.startswith((".", "~")) or text.endswith(".json")


@dataclass(frozen=True)
class Schedule:
    """Keep ratios per pruning layer, plus the scorer that chooses the kept tokens.

    `keep` maps a layer index to the fraction of that layer's candidates that goes on to deeper
    layers (`ceil(r * |S_l|)`, the last token always kept). `scorer` ranks the candidates: `last` is
    LazyLLM (reselected at every step), `static` prunes in prefill only, `random` keeps the same
    counts uniformly at random; see scoring.py for the others.
    """

    keep: dict[int, float] = field(default_factory=dict)
    scorer: Scorer = field(default_factory=Last)
    preset: str | None = field(default=None, compare=False)  # the preset it came from, refitted per model
    sparse: Sparse | None = None  # block-sparse attention in prefill (sparse.py); None: every row sees every key
    # A prompt shorter than this is neither pruned nor attends sparsely: there selecting costs more than it saves
    # (or, for Gemma 3's `balanced`, costs accuracy). None: the device's measured threshold (MIN_PROMPT_TOKENS); a
    # preset with its own floor (Preset.min_prompt_tokens) keeps it when refitted to a model, unless +min=N is given
    min_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, Scorer):
            raise ValueError(f"scorer must be a Scorer such as Last(); got {self.scorer!r} ({scorer_help()})")
        if self.sparse is not None and not isinstance(self.sparse, Sparse):
            raise ValueError(f"sparse must be a Sparse such as Sparse(top=0.05) or None; got {self.sparse!r}")
        n = self.min_prompt_tokens
        if n is not None and (not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0):
            raise ValueError(f"min_prompt_tokens={n!r} must be an int >= 0 (0: always prune) or None (by device)")
        for layer, ratio in self.keep.items():
            if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
                raise ValueError(f"pruning layer {layer!r} must be an int layer index")
            if not (isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0.0 < ratio <= 1.0):
                raise ValueError(
                    f"keep ratio {ratio!r} at layer {layer} must be in (0, 1]: it is the fraction of "
                    "candidates that goes on to deeper layers (1.0 keeps all)"
                )
        # numpy scalars (np.int64 layers, np.float32 ratios) become plain Python numbers
        object.__setattr__(self, "keep", {int(layer): float(ratio) for layer, ratio in sorted(self.keep.items())})

    @property
    def is_dense(self) -> bool:
        return not self.keep and self.sparse is None

    def min_prompt(self, device_type: str) -> int:
        """The shortest prompt that is pruned (and attends sparsely) on a device of this type ("cuda", "cpu")."""
        if self.min_prompt_tokens is not None:
            return self.min_prompt_tokens
        return MIN_PROMPT_TOKENS.get(device_type, 0)

    def check(self, num_layers: int, prunable: Sequence[int] | None = None) -> None:
        """Raise if a pruning layer does not exist, is the last one (nothing deeper to skip), or is not
        among the model's `prunable` layers (None: all; see `LlamaAdapter.prunable_layers`)."""
        for layer in self.keep:
            if not 0 <= layer <= num_layers - 2:
                raise ValueError(
                    f"pruning layer {layer} is out of range: this model has {num_layers} layers, so "
                    f"pruning layers must be in [0, {num_layers - 2}] (the last layer cannot prune)"
                )
        refused = [layer for layer in self.keep if prunable is not None and layer not in prunable]
        if refused:
            allowed = ", ".join(map(str, prunable)) if prunable else "none"
            raise ValueError(
                f"this model cannot prune at layer(s) {', '.join(map(str, refused))}: they attend within a "
                f"sliding window, where the last token cannot score most of the prompt. Layers that can "
                f"prune (full attention, not the last): {allowed}"
            )

    def kept_count(self, layer: int, n_candidates: int) -> int:
        """How many of `n_candidates` survive pruning at `layer` (ours: ceil, at least 1).

        Rounded first so that float error (0.28 * 25 = 7.000000000000001) does not keep an extra token.
        """
        return max(1, math.ceil(round(self.keep[layer] * n_candidates, 6)))

    def describe(self) -> str:
        """'last:9:0.7,18:0.7', 'last:9:0.7+sparse(top=0.1)+min=4096' -- the text `parse_schedule` reads back."""
        text = f"{self.scorer.spec()}:{','.join(f'{layer}:{r:g}' for layer, r in self.keep.items())}" if self.keep \
            else "dense"
        if self.sparse is not None:
            text += f"+{self.sparse.spec()}"
        if self.min_prompt_tokens is not None:
            text += f"+min={self.min_prompt_tokens}"
        return text

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FILE_FORMAT, "keep": {str(k): v for k, v in self.keep.items()},
                "scorer": self.scorer.spec(), "sparse": self.sparse.spec() if self.sparse else None,
                "min_prompt_tokens": self.min_prompt_tokens}

    def save(self, path: str | Path, **metadata) -> Path:
        """Write a schedule file that `--schedule FILE` and `LazyLLM(schedule=FILE)` read; `metadata`
        (model, num_layers, how it was chosen) is stored beside it and checked where it can be."""
        path = Path(path)
        path.write_text(json.dumps({**self.to_dict(), **metadata}, indent=2) + "\n")
        return path


def preset(
    name: str,
    num_layers: int,
    scorer: Scorer | None = None,
    prunable: Sequence[int] | None = None,
    presets: Mapping[str, Preset] = PRESETS,
) -> Schedule:
    """Instantiate a depth-relative preset for a model with `num_layers` layers (its own scorer unless given);
    `presets`: the model family's (its adapter's `presets`).

    On a model that prunes only at some layers (`prunable`, e.g. Gemma 3's full-attention layers),
    each point moves to the nearest of them (the earlier on a tie), and points that meet multiply
    their ratios, so the tokens left after the last point stay the preset's.
    """
    if name not in presets:
        raise ValueError(f"unknown schedule preset {name!r}; this model's presets: {', '.join(presets)}")
    spec = presets[name]
    if num_layers < 2:
        layers = f"{num_layers} layer{'s' if num_layers != 1 else ''}"
        raise ValueError(
            f"this model has {layers}, too few to prune (a pruned token needs a deeper layer to skip): "
            "run it dense (schedule 'dense')"
        )
    if prunable is not None and not prunable:
        raise ValueError(f"preset {name!r} needs a layer that can prune, and this model has none: use 'dense'")
    keep: dict[int, float] = {}
    for frac, ratio in spec.keep.items():
        layer = min(max(int(frac * num_layers), 0), num_layers - 2)
        if prunable is not None:
            layer = min(prunable, key=lambda p: (abs(p - layer), p))
            ratio = round(ratio * keep.get(layer, 1.0), 6)
        keep[layer] = ratio
    return Schedule(keep, scorer=scorer if scorer is not None else parse_scorer(spec.scorer), preset=name,
                    sparse=parse_sparse(spec.sparse) if spec.sparse else None, min_prompt_tokens=spec.min_prompt_tokens)


def parse_schedule(
    spec: str | Path | Schedule | dict | None,
    num_layers: int,
    prunable: Sequence[int] | None = None,
    presets: Mapping[str, Preset] = PRESETS,
    *,
    files: bool = True,
) -> Schedule:
    """Turn what a user wrote into a checked Schedule; `prunable`: the layers the model can prune at (None: all),
    `presets`: the model family's presets (its adapter's `presets`); `files=False`: a path (`looks_like_path`)
    raises FileRefused instead of being opened, for text from someone who may not read this machine's files (a
    server's client).

    Accepts a Schedule, a `{layer: ratio}` dict, None / "dense" / "none" (no pruning), a preset name
    ("paper"), layer:ratio pairs ("9:0.7,19:0.7"), either of those after a scorer and a colon
    ("static:paper", "pool(k=7):9:0.7"), a scorer alone (the paper preset ranked by it), or the path of
    a schedule file (JSON, as written by `lazyprefill tune` or `Schedule.save`). Options follow a '+': block-sparse
    prefill attention ("paper+sparse", "dense+sparse(top=0.1)") and the shortest prompt that is pruned
    ("balanced+min=2048").
    """
    if spec is None:
        schedule = Schedule()
    elif isinstance(spec, Schedule):
        schedule = spec
    elif isinstance(spec, dict):
        schedule = Schedule(dict(spec))
    elif not files and (isinstance(spec, Path) or (isinstance(spec, str) and looks_like_path(spec))):
        raise FileRefused("a schedule file's path is not accepted here: give a preset or layer:ratio pairs")
    elif isinstance(spec, Path) or (isinstance(spec, str) and spec.strip().endswith(".json")):
        schedule = load_schedule(Path(spec), num_layers)
    elif isinstance(spec, str):
        schedule = _parse_options(spec.strip(), num_layers, presets, files)
    else:
        raise TypeError(f"schedule must be a str, path, dict, Schedule or None, not {type(spec).__name__}")
    if prunable is not None and schedule.preset is not None:  # fit the preset to this model's layers
        fitted = preset(schedule.preset, num_layers, schedule.scorer, prunable, presets)
        shortest = fitted.min_prompt_tokens if schedule.min_prompt_tokens is None else schedule.min_prompt_tokens
        schedule = replace(fitted, sparse=schedule.sparse, min_prompt_tokens=shortest)
    schedule.check(num_layers, prunable)
    return schedule


def split_list(text: str) -> list[str]:
    """'paper, pool(k=5, of=window(w=8)):9:0.5;18:0.5' -> ['paper', 'pool(k=5, of=window(w=8)):9:0.5,18:0.5'].

    Items are separated by commas outside parentheses (scorer specs hold commas); within an item a ';'
    joins layer:ratio pairs."""
    items, depth, start = [], 0, 0
    for at, char in enumerate(text + ","):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            items.append(text[start:at])
            start = at + 1
    out = []
    for item in items:
        parts, depth = [], 0
        for char in item.strip():
            depth += (char == "(") - (char == ")")
            parts.append("," if char == ";" and depth == 0 else char)
        if "".join(parts):
            out.append("".join(parts))
    return out


def load_schedule(path: Path, num_layers: int | None = None) -> Schedule:
    """Read a schedule file, saying what is wrong with it and how to fix it when it is not one."""
    where = f"schedule file {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist: write one with `lazyprefill tune` or Schedule.save()")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}): write one with `lazyprefill tune`") from None
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FILE_FORMAT:
        raise ValueError(f"{where} is not a lazyprefill schedule: it needs \"format\": \"{SCHEDULE_FILE_FORMAT}\"")
    keep = data.get("keep")
    if not isinstance(keep, dict):
        raise ValueError(f"{where} needs \"keep\": an object of layer -> keep ratio, e.g. {{\"9\": 0.7}}")
    try:
        layers = {int(layer): ratio for layer, ratio in keep.items()}
    except ValueError:
        raise ValueError(f"{where}: the keys of \"keep\" must be layer indices, got {list(keep)}") from None
    if not isinstance(data.get("scorer", "last"), str):
        raise ValueError(f"{where}: \"scorer\" must be a string such as \"last\" or \"pool(k=7)\"")
    expected = data.get("num_layers")
    if num_layers is not None and expected is not None and expected != num_layers:
        raise ValueError(
            f"{where} was tuned for a model with {expected} layers, but this one has {num_layers}: "
            "tune a schedule for this model"
        )
    try:
        sparse = data.get("sparse")
        return Schedule(layers, scorer=parse_scorer(data.get("scorer", "last")),
                        sparse=parse_sparse(sparse) if sparse else None,
                        min_prompt_tokens=data.get("min_prompt_tokens"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _parse_options(text: str, num_layers: int, presets: Mapping[str, Preset], files: bool) -> Schedule:
    """'paper+sparse(top=0.1)+min=4096': a schedule, then options, each after a '+' outside parentheses."""
    parts, depth, start = [], 0, 0
    for at, char in enumerate(text + "+"):
        depth += (char == "(") - (char == ")")
        if char == "+" and depth == 0:
            parts.append(text[start:at].strip())
            start = at + 1
    if depth != 0:  # unbalanced parentheses: the scorer's parser says where
        parts = [text]
    base, options = parts[0], parts[1:]
    schedule = _parse_text(base, num_layers, presets, files) if base or not options else Schedule()
    for option in options:
        if option.startswith("sparse"):
            schedule = replace(schedule, sparse=parse_sparse(option))
        elif option.startswith("min="):
            try:
                schedule = replace(schedule, min_prompt_tokens=int(option[4:]))
            except ValueError:
                raise ValueError(f"{option!r} in schedule {text!r}: write min=N, the shortest prompt that is pruned") \
                    from None
        else:
            raise ValueError(f"unknown schedule option {option!r} in {text!r}: options are sparse(...) and min=N")
    return schedule


def _parse_text(text: str, num_layers: int, presets: Mapping[str, Preset], files: bool) -> Schedule:
    """A schedule without options; `files`: whether the error for unknown text may suggest a schedule file."""
    if text == "":
        raise ValueError("the schedule is empty: use 'dense' for no pruning, or a preset such as 'paper'")
    if text in DENSE_NAMES:
        return Schedule()
    scorer, rest = _split_scorer(text)
    if rest == "" and scorer is not None:
        rest = "paper"
    if rest in presets:
        return preset(rest, num_layers, scorer, presets=presets)
    keep: dict[int, float] = {}
    for item in rest.split(","):
        layer, sep, ratio = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            index, value = int(layer), float(ratio)
        except ValueError:
            raise ValueError(
                f"unknown schedule {text!r}: use a preset ({', '.join(presets)}), 'dense' or layer:ratio pairs "
                "such as '9:0.7,19:0.7', either optionally after a scorer and a colon ('static:paper', "
                f"'pool(k=7):9:0.7'){', or a schedule file (.json)' if files else ''}. Scorers: {scorer_help()}"
            ) from None
        if index in keep:
            raise ValueError(f"layer {index} appears twice in the schedule {text!r}: give each layer one keep ratio")
        keep[index] = value
    return Schedule(keep, scorer=scorer or Last())


def _split_scorer(text: str) -> tuple[Scorer | None, str]:
    """'pool(k=7):9:0.7' -> (Pool(k=7), '9:0.7'); text that starts with no scorer name -> (None, text)."""
    name = text.split("(", 1)[0].split(":", 1)[0].strip()
    if ALIASES.get(name, name) not in SCORERS:
        return None, text
    end = len(name)
    if text[end:].lstrip().startswith("("):
        depth = 0
        for at, char in enumerate(text):
            depth += (char == "(") - (char == ")")
            if char == ")" and depth == 0:
                end = at + 1
                break
        else:
            raise ValueError(f"missing ')' in the scorer of schedule {text!r}")
    rest = text[end:].strip()
    if rest and not rest.startswith(":"):
        raise ValueError(f"schedule {text!r}: put a ':' between the scorer and the layers or preset")
    return parse_scorer(text[:end]), rest[1:].strip()
