"""The benchmark harness: its FLOP arithmetic, and that `lazyprefill bench` writes a complete result.

No timing is asserted: only that every method was timed and every column is filled in.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from helpers import tiny_model
from typer.testing import CliRunner

from lazyprefill import PRESETS, bench
from lazyprefill.bench import TRANSFORMERS, TRANSFORMERS_FLASH, BenchConfig, ModelDims, ideal_speedup, prefill_flops
from lazyprefill.cli import app

# 2 layers, d=4, 2 query heads and 1 K/V head of size 2, FFN 8, vocab 10.
DIMS = ModelDims(layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, ffn=8, vocab=10)


def test_flop_counts_by_hand():
    # per token and layer: 2 * (q 4*4 + k,v 2*4*2 + o 4*4 + MLP 3*4*8) = 2 * 144
    assert DIMS.linear_flops == 288
    # per (query, key) pair and layer: q.k and p.v, 2 FLOPs per multiply-add, 2 heads of size 2
    assert DIMS.attention_flops == 16
    # layer 0 runs 4 tokens (4*5/2 causal pairs), layer 1 runs 2 (3 pairs), LM head 2*4*10 on one token
    assert prefill_flops(DIMS, [4, 2]) == (4 * 288 + 10 * 16) + (2 * 288 + 3 * 16) + 80 == 2016
    assert prefill_flops(DIMS, [4, 4]) == 2 * 1312 + 80 == 2704


def test_ideal_speedup_by_hand():
    assert ideal_speedup(DIMS, [4, 2]) == pytest.approx(2704 / 2016)
    assert ideal_speedup(DIMS, [4, 4]) == 1.0


def test_flop_counts_of_a_sliding_window_layer_by_hand():
    windowed = ModelDims(**{**asdict(DIMS), "windows": (2, None)})
    # layer 0 slides over 2 positions: its 4 queries see 1, 2, 2, 2 keys
    assert prefill_flops(windowed, [4, 4]) == (4 * 288 + 7 * 16) + (4 * 288 + 10 * 16) + 80
    last_slides = ModelDims(**{**asdict(DIMS), "windows": (None, 2)})
    # 2 of the 4 tokens reach layer 1: a 2-position window holds about 1 of them, so 2 pairs
    assert prefill_flops(last_slides, [4, 2]) == (4 * 288 + 10 * 16) + (2 * 288 + 2 * 16) + 80
    with pytest.raises(ValueError, match="one window"):
        ModelDims(**{**asdict(DIMS), "windows": (2,)})


def test_model_dims_read_the_windows_of_a_mixed_model():
    assert ModelDims.of(tiny_model("gemma3")).windows == (None, 8) * 3
    assert ModelDims.of(tiny_model("mistral")).windows == (4096,) * 6  # its config default
    assert ModelDims.of(tiny_model("llama_mha")).windows == ()


def test_ideal_speedup_wants_one_count_per_layer():
    with pytest.raises(ValueError, match="one token count per layer"):
        ideal_speedup(DIMS, [4, 2, 1])


def check_result(result: dict, model: str, lengths: list[int], decode_lengths: list[int]) -> None:
    assert {"machine", "protocol", "models"} <= result.keys()
    assert {"torch", "transformers", "platform", "cpu"} <= result["machine"].keys()
    (entry,) = result["models"]
    assert entry["name"] == model
    assert {"config", "dims", "schedules", "ttft", "decode"} <= entry.keys()
    layers = entry["dims"]["layers"]
    methods = [TRANSFORMERS, "dense", *PRESETS]
    assert [(r["length"], r["method"]) for r in entry["ttft"]] == [(n, m) for n in lengths for m in methods]
    for row in entry["ttft"]:
        assert row["note"] == ""
        assert len(row["times_ms"]) == result["protocol"]["repeats"] and row["ms"] > 0
        assert row["speedup"] > 0 and row["efficiency"] > 0
        assert len(row["computed"]) == layers
        if row["method"] in (TRANSFORMERS, "dense"):
            assert row["computed"] == [row["length"]] * layers and row["ideal"] == 1.0
        else:  # a preset prunes, so fewer tokens reach the last layer
            assert row["computed"][-1] < row["length"] and row["ideal"] > 1.0
    decode_methods = [TRANSFORMERS, TRANSFORMERS_FLASH, "dense", *PRESETS]
    assert [(r["length"], r["method"]) for r in entry["decode"]] == [
        (n, m) for n in decode_lengths for m in decode_methods
    ]
    assert all(r["ms_per_token"] > 0 and r["new_tokens"] == 129 for r in entry["decode"])


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    assert "| prompt | method | TTFT ms |" in result.output


def test_bench_on_a_tiny_model_writes_json_table_and_plot(tmp_path):
    run_cli(["--preset", "cpu", "--model", "tiny", "--lengths", "48,96", "--decode-lengths", "48",
             "--repeats", "2", "--out", str(tmp_path), "--stem", "t"])
    check_result(json.loads((tmp_path / "t.json").read_text()), "tiny", [48, 96], [48])
    assert (tmp_path / "t.md").read_text().startswith("Machine:")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_bench_cpu_preset_on_smollm2(tmp_path):
    """The issue's CI command: `lazyprefill bench --preset cpu --lengths 1024 --repeats 2`."""
    run_cli(["--preset", "cpu", "--lengths", "1024", "--repeats", "2", "--out", str(tmp_path)])
    check_result(json.loads((tmp_path / "cpu.json").read_text()), "smollm2", [1024], [1024])


def test_bench_rejects_an_unknown_preset(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "tpu", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown bench preset 'tpu'" in result.output


def test_bench_batches_write_rows_for_every_batch_and_method(tmp_path):
    run = CliRunner().invoke(app, ["bench", "--preset", "cpu", "--model", "tiny", "--lengths", "48",
                                   "--decode-lengths", "", "--batch-sizes", "1,3", "--batch-length", "40",
                                   "--repeats", "1", "--out", str(tmp_path), "--stem", "b"])
    assert run.exit_code == 0, run.output
    (entry,) = json.loads((tmp_path / "b.json").read_text())["models"]
    methods = [TRANSFORMERS, "dense", *PRESETS]
    assert [(r["batch"], r["method"]) for r in entry["batch_ttft"]] == [(b, m) for b in (1, 3) for m in methods]
    for row in entry["batch_ttft"]:
        assert row["length"] == 40 and row["ms"] > 0 and row["prefill_tokens_per_s"] > 0
    decode = [(r["batch"], r["method"]) for r in entry["batch_decode"]]
    assert decode == [(b, m) for b in (1, 3) for m in [TRANSFORMERS, TRANSFORMERS_FLASH, "dense", *PRESETS]]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 33 for r in entry["batch_decode"])
    assert "| batch | method | TTFT ms |" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b-batch.png").stat().st_size > 0


def test_the_progress_bar_counts_every_label_run_emits():
    """`progress_total` is the bar's length: one label per warm-up and per timed round (the rounds are most of the
    time on long prompts), per decoding method, per batch."""
    cfg = BenchConfig(lengths={"tiny": [24, 32]}, decode_lengths=[24], repeats=3, warmup=0, decode_tokens=2,
                      device="cpu", dtype="float32", batch_sizes=[2], batch_length=16, batch_decode_tokens=2)
    labels = []
    bench.run(cfg, labels.append)
    assert len(labels) == bench.progress_total(cfg)
    assert labels.count("24 x1 round 3/3") == 1


def test_ttft_at_new_lengths_times_each_method_at_lengths_no_other_met(monkeypatch):
    """bench_ttft(new_length=True): after the rounds, each method once at each of NEW_LENGTHS lengths under n, none
    shared between methods (a kernel's per-length build, which one method paid, would be missing from the next's)."""
    from lazyprefill.bench import timing

    seen: dict[str, list[int]] = {}
    real = timing.time_once

    def recording(fn, x):
        seen.setdefault(fn.__qualname__ + str(id(fn)), []).append(x[0].shape[0])
        return real(fn, x)

    monkeypatch.setattr(timing, "time_once", recording)
    cfg = BenchConfig(lengths={"tiny": [64]}, repeats=1, warmup=0, device="cpu", dtype="float32")
    model = tiny_model("llama_gqa_rope3")
    rows = timing.bench_ttft(model, 64, cfg, lambda _label: None, new_length=True)
    fresh = [lengths[1:] for lengths in seen.values()]  # the first call of each method is its round at 64
    assert [len(f) for f in fresh] == [timing.NEW_LENGTHS] * len(rows)
    flat = [m for f in fresh for m in f]
    assert len(set(flat)) == len(flat) and max(flat) < 64
    for row in rows:
        assert len(row["new_length_times_ms"]) == timing.NEW_LENGTHS and row["new_length_ms"] > 0
        assert row["new_length_speedup"] > 0
    assert all("new_length_ms" not in r for r in timing.bench_ttft(model, 64, cfg, lambda _label: None))


def test_ttft_hands_over_the_rounds_before_the_new_length_runs(monkeypatch):
    """bench_ttft(timed=...): the rows with their medians and speedups once the rounds are done and before any
    new-length run, so that a long run cut off in those (a lease's end at 128K) keeps its rounds."""
    from lazyprefill.bench import timing

    calls = []
    real = timing.time_once

    def counting(fn, x):
        calls.append(x[0].shape[0])
        return real(fn, x)

    monkeypatch.setattr(timing, "time_once", counting)
    handed: list[tuple[int, list[dict]]] = []
    cfg = BenchConfig(lengths={"tiny": [64]}, repeats=2, warmup=0, device="cpu", dtype="float32")
    rows = timing.bench_ttft(tiny_model("llama_gqa_rope3"), 64, cfg, lambda _label: None, new_length=True,
                             timed=lambda early: handed.append((len(calls), [dict(r) for r in early])))
    assert len(handed) == 1
    timed_calls, early = handed[0]
    assert timed_calls == cfg.repeats * len(rows) and set(calls[:timed_calls]) == {64}  # the rounds, nothing after
    assert all(r["ms"] > 0 and r["speedup"] > 0 and "new_length_ms" not in r for r in early)
    assert [r["ms"] for r in early] == [r["ms"] for r in rows]
    assert all(r["new_length_ms"] > 0 for r in rows)
