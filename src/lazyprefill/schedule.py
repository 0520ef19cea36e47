"""Pruning schedules: which layers prune, how much each keeps, and how tokens are chosen."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["lazy", "static", "random"]
MODES: tuple[str, ...] = ("lazy", "static", "random")

# Presets are fractions of depth so one name fits every model size. `paper` is Figure 4 of the paper:
# prune at ~30%, ~60% and ~90% of depth, dropping 30% of the current candidates each time.
# `aggressive` is the fastest schedule of our evaluation within 5% (relative) of dense on code, recall
# and passkey (SmolLM2-135M, 512 tokens, CPU: 1.18x measured TTFT speedup; results/README.md). No
# schedule we measured stayed within 1% on every task, so there is no `balanced` preset yet.
PRESETS: dict[str, dict[float, float]] = {
    "paper": {0.3: 0.7, 0.6: 0.7, 0.9: 0.7},
    "aggressive": {0.67: 0.5},
}
DENSE_NAMES = ("dense", "none")


@dataclass(frozen=True)
class Schedule:
    """Keep ratios per pruning layer, plus how the kept tokens are chosen.

    `keep` maps a layer index to the fraction of that layer's candidates that goes on to deeper
    layers (`ceil(r * |S_l|)`, the last token always kept). `mode` picks the method: `lazy` (LazyLLM,
    reselected at every step), `static` (prefill-only pruning, never revived) or `random` (the same
    keep counts, chosen uniformly at random with `seed`; sequence i of a batch uses `seed + i`).
    """

    keep: dict[int, float] = field(default_factory=dict)
    mode: Mode = "lazy"
    seed: int = 0
    preset: str | None = field(default=None, compare=False)  # the preset it came from, refitted per model

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown schedule mode {self.mode!r}; use one of {', '.join(MODES)}")
        for layer, ratio in self.keep.items():
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"pruning layer {layer!r} must be an int layer index")
            if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
                raise ValueError(
                    f"keep ratio {ratio!r} at layer {layer} must be in (0, 1]: it is the fraction of "
                    "candidates that goes on to deeper layers (1.0 keeps all)"
                )
        object.__setattr__(self, "keep", dict(sorted(self.keep.items())))

    @property
    def is_dense(self) -> bool:
        return not self.keep

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


def preset(
    name: str, num_layers: int, mode: Mode = "lazy", seed: int = 0, prunable: Sequence[int] | None = None
) -> Schedule:
    """Instantiate a depth-relative preset for a model with `num_layers` layers.

    On a model that prunes only at some layers (`prunable`, e.g. Gemma 3's full-attention layers),
    each point moves to the nearest of them (the earlier on a tie), and points that meet multiply
    their ratios, so the tokens left after the last point stay the preset's.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown schedule preset {name!r}; presets: {', '.join(PRESETS)}")
    if prunable is not None and not prunable:
        raise ValueError(f"preset {name!r} needs a layer that can prune, and this model has none: use 'dense'")
    keep: dict[int, float] = {}
    for frac, ratio in PRESETS[name].items():
        layer = min(max(int(frac * num_layers), 0), num_layers - 2)
        if prunable is not None:
            layer = min(prunable, key=lambda p: (abs(p - layer), p))
            ratio = round(ratio * keep.get(layer, 1.0), 6)
        keep[layer] = ratio
    return Schedule(keep, mode=mode, seed=seed, preset=name)


def parse_schedule(
    spec: str | Schedule | dict | None, num_layers: int, seed: int = 0, prunable: Sequence[int] | None = None
) -> Schedule:
    """Turn what a user wrote into a checked Schedule; `prunable`: the layers the model can prune at (None: all).

    Accepts a Schedule, a `{layer: ratio}` dict, None / "dense" / "none" (no pruning), a preset name
    ("paper"), "static" or "random" (the paper preset in that mode), "9:0.7,19:0.7" and a mode
    prefix on either form ("static:paper", "random:9:0.7,19:0.7").
    """
    if spec is None:
        schedule = Schedule()
    elif isinstance(spec, Schedule):
        schedule = spec
    elif isinstance(spec, dict):
        schedule = Schedule(dict(spec), seed=seed)
    elif isinstance(spec, str):
        schedule = _parse_text(spec.strip(), num_layers, seed)
    else:
        raise TypeError(f"schedule must be a str, dict, Schedule or None, not {type(spec).__name__}")
    if prunable is not None and schedule.preset is not None:  # fit the preset to this model's layers
        schedule = preset(schedule.preset, num_layers, schedule.mode, schedule.seed, prunable)
    schedule.check(num_layers, prunable)
    return schedule


def _parse_text(text: str, num_layers: int, seed: int) -> Schedule:
    if text in DENSE_NAMES or text == "":
        return Schedule()
    mode: Mode = "lazy"
    head, _, rest = text.partition(":")
    if head in MODES and (rest or head != "lazy"):
        mode, text = head, (rest or "paper")  # type: ignore[assignment]
    if text in PRESETS:
        return preset(text, num_layers, mode=mode, seed=seed)
    keep: dict[int, float] = {}
    for item in text.split(","):
        layer, sep, ratio = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            keep[int(layer)] = float(ratio)
        except ValueError:
            raise ValueError(
                f"unknown schedule {text!r}: use a preset ({', '.join(PRESETS)}), 'dense', 'static', "
                "'random', or layer:ratio pairs such as '9:0.7,19:0.7' (optionally prefixed by "
                "'static:' or 'random:')"
            ) from None
    return Schedule(keep, mode=mode, seed=seed)
