"""The whole-answer benchmark end to end on a tiny random model (CPU): structure and invariants, no timings."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
import transformers as tf

from lazyprefill import answers
from lazyprefill.bench import ModelDims, random_model, random_prompts
from lazyprefill.engine import DecodeOptions
from lazyprefill.generation import LazyLLM
from lazyprefill.schedule import PRESETS

LLAMA2_7B = ModelDims(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, ffn=11008, vocab=32000)
LLAMA3_8B = ModelDims(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256)
N, BATCH, NEW = 48, 2, [5, 12]


def config(**overrides) -> answers.AnswerConfig:
    base = {"models": ["tiny"], "lengths": [N], "batch_sizes": [BATCH], "new_tokens": NEW, "device": "cpu",
            "dtype": "float32", "warmup_tokens": 3, "steady_skip": 2, "copy_mb": 4}
    return answers.AnswerConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def result() -> dict:
    return answers.run(config())


def test_every_method_runs_in_order(result):
    (case,) = result["cases"]
    assert (case["model"], case["length"], case["batch"], case["new_tokens"]) == ("tiny", N, BATCH, max(NEW))
    assert [r["method"] for r in case["rows"]] == ["transformers", "dense", *PRESETS, "transformers-static"]
    assert all(r["status"] == "ok" for r in case["rows"])
    assert result["models"]["tiny"]["random_weights"] and case["copy_gb_per_s"] > 0


def test_totals_come_from_one_run(result):
    for r in result["cases"][0]["rows"]:
        totals = r["totals_ms"]
        assert set(totals) == {"5", "12"} and len(r["step_ms"]) == max(NEW) - 1
        assert 0 < r["ttft_ms"] <= totals["5"] <= totals["12"]
        # the longer total is the shorter one plus the steps between them
        assert totals["12"] == pytest.approx(totals["5"] + sum(r["step_ms"][4:]), abs=0.01)
        assert r["ms_per_token"] == pytest.approx(statistics.median(r["step_ms"][2:]), abs=1e-3)


def test_floor_bytes_follow_the_shape(result):
    (case,) = result["cases"]
    model = random_model("tiny", "cpu", torch.float32)
    kv = 2 * 2 * 16 * 4  # K and V x 2 KV heads x head size 16 x 4 bytes
    assert case["kv_bytes_per_key"] == kv
    assert case["weight_bytes"] == answers.weight_bytes(model)
    steady = range(3, max(NEW))  # decoding steps after steady_skip=2; step k attends over N + k positions
    dense = statistics.fmean(case["weight_bytes"] + BATCH * 4 * (N + k) * kv for k in steady)
    for r in case["rows"]:
        assert r["bytes_per_step_dense"] == pytest.approx(dense)
        assert r["floor_ms_dense"] == pytest.approx(dense / (case["copy_gb_per_s"] * 1e9) * 1e3)
    rows = {r["method"]: r for r in case["rows"]}
    assert rows["dense"]["bytes_per_step_candidates"] == pytest.approx(dense)  # every token is a candidate
    for name in PRESETS:
        assert rows[name]["bytes_per_step_candidates"] < dense
    assert "bytes_per_step_candidates" not in rows["transformers"]


def test_revivals_are_the_engines_counts(result):
    rows = {r["method"]: r for r in result["cases"][0]["rows"]}
    assert rows["dense"]["revived_per_step"] == [0] * (max(NEW) - 1)
    model = random_model("tiny", "cpu", torch.float32)
    prompts = random_prompts(N, model.config.vocab_size, BATCH, torch.device("cpu"), 0)
    for name in PRESETS:
        outs = LazyLLM(model, name).generate(prompts, max_new_tokens=max(NEW), eos_token_id=[])
        per_seq = [[sum(s.revived) for s in out.stats.steps[1:]] for out in outs]
        assert rows[name]["revived_per_step"] == [sum(col) for col in zip(*per_seq)]
        assert rows[name]["revived_max"] == max(max(seq) for seq in per_seq)
        assert rows[name]["revived_mean"] == pytest.approx(statistics.fmean(x for seq in per_seq for x in seq))


def test_weight_bytes_count_tied_weights_once():
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg)
    # embedding (= LM head) 800, q 64, k 32, v 32, o 64, MLP 3 x 128, two layer norms and the final norm 3 x 8
    assert answers.weight_bytes(model) == (800 + 64 + 32 + 32 + 64 + 384 + 24) * 4


def test_memory_need_tells_what_cannot_fit():
    kv = answers.kv_bytes_per_key(LLAMA2_7B, 2)
    assert kv == 16384 and answers.dense_keys(LLAMA2_7B, 8192, 1, 1) == 32 * 8193  # 4.3 GB of K/V, MEASURE.md
    weights = 13_476_831_232  # llama2-7b in bf16
    need = answers.memory_need(LLAMA2_7B, weights, 2, "transformers", 32768, 8, 512)
    assert need > weights + 8 * (32768 + 512) * 32 * kv > 139 * 2**30  # more than an H200 holds
    ours = answers.memory_need(LLAMA2_7B, weights, 2, "paper", 32768, 8, 512)
    assert ours - need == 8 * (32768 + 512) * 4096 * 2  # the Aux Cache
    assert answers.memory_need(LLAMA3_8B, 16_060_522_496, 2, "dense", 8192, 1, 512) < 20 * 2**30


def test_a_method_that_does_not_fit_is_recorded_not_run():
    model = random_model("tiny", "cpu", torch.float32)
    limit = answers.weight_bytes(model) / 2**30 + 1e-6  # almost nothing beside the weights
    result = answers.run(config(methods=["transformers", "paper"], memory_limit_gb=limit))
    rows = result["cases"][0]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("transformers", "does not fit"), ("paper", "does not fit")]
    assert all("ttft_ms" not in r and r["need_gb"] > r["free_gb"] for r in rows)
    assert "does not fit" in answers.markdown(result)


def test_config_says_what_to_change():
    with pytest.raises(ValueError, match=r"'fastest' is neither one of .* nor a schedule spec: unknown schedule"):
        config(methods=["paper", "fastest"])
    with pytest.raises(ValueError, match="steady state"):
        config(new_tokens=[4])
    with pytest.raises(ValueError, match=r"rounds=0: give an int >= 1"):
        config(rounds=0)
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        config(models=["smollm2"], lengths=[256], task="qa")
    with pytest.raises(ValueError, match="tiny: random-weight shapes have no tokenizer"):
        config(lengths=[256], task="recall")
    with pytest.raises(ValueError, match="at least 128 tokens"):
        config(models=["smollm2"], task="recall")


def test_task_prompts_are_the_samples_of_a_real_model_and_text():
    from lazyprefill.eval import tasks
    from lazyprefill.models import load_tokenizer

    cfg = config(models=["smollm2"], lengths=[256], batch_sizes=[1], methods=["dense", "balanced"], task="passkey")
    samples = tasks.build("passkey", load_tokenizer("smollm2"), 256, 2, cfg.seed)
    timed, warm = answers.case_prompts(cfg, 256, 1, 49152, torch.device("cpu"), load_tokenizer("smollm2"))
    assert [p.tolist() for p in timed + warm] == [s.prompt_ids for s in samples]  # the warm-up's is another sample
    result = answers.run(cfg)
    (case,) = result["cases"]
    assert [(r["method"], r["status"]) for r in case["rows"]] == [("dense", "ok"), ("balanced", "ok")]
    assert not result["models"]["smollm2"]["random_weights"] and "revived_mean" in case["rows"][1]
    assert "### smollm2 (float32, `passkey` prompts)" in answers.markdown(result)


def test_rounds_take_turns_and_report_medians():
    """With rounds the methods run in turns (dense, paper, dense, paper, ...; the static cache once, as it
    compiles), every checkpoint is whole, and a row's figures are the medians of its rounds, its ratio to dense
    the median of the rounds' ratios."""
    snapshots: list[dict] = []
    cfg = config(methods=["dense", "paper", "transformers-static"], rounds=3)
    result = answers.run(cfg, checkpoint=lambda r: snapshots.append(json.loads(json.dumps(r))))
    assert cfg.runs_per_case() == 3 + 2 * 2 == len(snapshots)
    # the methods took turns: after each of rounds 2 and 3, dense was timed again before paper
    counts = [[len(r.get("rounds", [r])) for r in s["cases"][0]["rows"]] for s in snapshots[3:]]
    assert counts == [[2, 1, 1], [2, 2, 1], [3, 2, 1], [3, 3, 1]]
    dense, paper, static = result["cases"][0]["rows"]
    assert "rounds" not in static  # timed once, against dense's first round
    assert static["ms_per_token_vs_dense"] == static["ms_per_token"] / dense["rounds"][0]["ms_per_token"]
    for row in (dense, paper):
        rounds = row["rounds"]
        assert len(rounds) == 3 and all(r["ms_per_token"] > 0 for r in rounds)
        assert row["ms_per_token"] == statistics.median(r["ms_per_token"] for r in rounds)
        assert row["tokens_per_s"] == pytest.approx(BATCH * 1e3 / row["ms_per_token"])
        assert row["ttft_ms"] == statistics.median(r["ttft_ms"] for r in rounds)
        assert row["totals_ms"]["12"] == statistics.median(r["totals_ms"]["12"] for r in rounds)
        assert rounds[0]["ms_per_token"] == pytest.approx(statistics.median(row["step_ms"][2:]), abs=1e-3)
    assert dense["ms_per_token_vs_dense"] == 1.0
    ratios = [p["ms_per_token"] / d["ms_per_token"] for p, d in zip(paper["rounds"], dense["rounds"])]
    assert paper["ms_per_token_vs_dense"] == statistics.median(ratios)
    assert "| step vs dense |" in answers.markdown(result)


def test_schedule_specs_run_as_methods_after_the_presets():
    cfg = config(methods=["revive(rows=4):paper", "transformers-static", "dense"])
    assert cfg.selected == ["dense", "revive(rows=4):paper", "transformers-static"]
    rows = answers.run(config(methods=["revive(rows=4):paper"]))["cases"][0]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("revive(rows=4):paper", "ok")]
    assert rows[0]["revived_max"] <= 2 * 3  # at most rows - 1 a step after each of paper's two pruning layers


def test_merge_joins_chunks_of_one_case(result, tmp_path):
    case = result["cases"][0]
    first, second = json.loads(json.dumps(result)), json.loads(json.dumps(result))
    first["cases"][0]["rows"] = case["rows"][3:]
    second["cases"][0]["rows"] = case["rows"][:3]
    merged = answers.merge([first, second])
    assert merged["cases"] == [case] and len(merged["runs"]) == 2
    paths = answers.write(merged, tmp_path, "merged")
    assert json.loads(paths["json"].read_text())["cases"] == [case] and paths["png"].stat().st_size > 0
    assert all(f"| {r['method']} |" in paths["md"].read_text() for r in case["rows"])


def test_cli_writes_json_table_plot_and_command(tmp_path):
    spec = importlib.util.spec_from_file_location("answers_cli", Path(__file__).parents[1] / "benchmarks/answers.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--models", "tiny", "--lengths", "32", "--batch-sizes", "1", "--new-tokens", "11", "--methods", "dense",
            "--device", "cpu", "--dtype", "float32", "--warmup-tokens", "2", "--copy-mb", "4",
            "--out", str(tmp_path), "--stem", "chunk"]
    cli.main(argv)
    saved = json.loads((tmp_path / "chunk.json").read_text())
    assert saved["command"].startswith("python benchmarks/answers.py --models tiny")
    assert [r["method"] for r in saved["cases"][0]["rows"]] == ["dense"]
    assert (tmp_path / "chunk.md").exists() and (tmp_path / "chunk.png").exists()


def test_rows_of_other_decode_options_are_named_by_them():
    assert answers.method_label("paper", DecodeOptions()) == "paper"
    assert answers.method_label("paper", DecodeOptions(burst_kernel=True)) == "paper (burst_kernel=True)"
    assert answers.method_label(answers.TRANSFORMERS, DecodeOptions(compile=True)) == answers.TRANSFORMERS
    options = DecodeOptions(burst_kernel=True, compile=True)
    assert answers.method_label(answers.DENSE, options) == "dense (compile=True)"  # it never revives


def test_steps_are_set_beside_dense_whose_label_names_its_decode_options():
    (case,) = answers.run(config(methods=["dense", "paper"], decode=DecodeOptions(graph_layout=False)))["cases"]
    dense, paper = case["rows"]
    assert (dense["method"], paper["method"]) == ("dense (graph_layout=False)", "paper (graph_layout=False)")
    assert dense["ms_per_token_vs_dense"] == 1.0
    assert paper["ms_per_token_vs_dense"] == paper["ms_per_token"] / dense["ms_per_token"]


def test_revivals_count_prompt_tokens_taken_deeper():
    model = random_model("tiny", "cpu", torch.float32)
    prompt = random_prompts(N, model.config.vocab_size, 1, torch.device("cpu"), 3)[0]
    lazies = {name: LazyLLM(model, name) for name in ("dense", "static", "paper")}
    got = {name: answers.revivals(lazy.generate(prompt, 8, eos_token_id=[]).stats, N)
           for name, lazy in lazies.items()}
    assert got["dense"] == {"revived_per_step": [0] * 7, "prompt_tokens": N, "prompt_deferred": 0, "prompt_revived": 0}
    assert got["static"]["prompt_deferred"] > 0 and got["static"]["prompt_revived"] == 0  # never revived
    paper = got["paper"]
    assert 0 < paper["prompt_revived"] <= paper["prompt_deferred"] < N
    assert sum(paper["revived_per_step"]) >= paper["prompt_revived"]  # a token may be revived at several layers


def test_a_method_that_runs_out_of_memory_is_recorded_and_the_next_goes_on(monkeypatch):
    real = answers.runner

    def runner(method, model, new, decode):
        if method == "dense":
            def run(prompts, clock, stop):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return run
        return real(method, model, new, decode)

    monkeypatch.setattr(answers, "runner", runner)
    rows = answers.run(config(methods=["dense", "paper"]))["cases"][0]["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("dense", "out of memory"), ("paper", "ok")]
    assert "Tried to allocate" in rows[0]["note"] and "ttft_ms" not in rows[0] and rows[1]["ttft_ms"] > 0


def test_checkpoints_grow_by_one_method_and_each_can_be_merged():
    snapshots: list[dict] = []
    answers.run(config(methods=["dense", "paper"]), checkpoint=lambda r: snapshots.append(json.loads(json.dumps(r))))
    assert [[r["method"] for r in s["cases"][0]["rows"]] for s in snapshots] == [["dense"], ["dense", "paper"]]
    for snapshot in snapshots:
        assert answers.merge([snapshot])["cases"] == snapshot["cases"]


@pytest.mark.parametrize("method", ["transformers", "transformers-static", "paper"])
def test_warm_up_stops_early_with_the_full_runs_allocation(method):
    model = random_model("tiny", "cpu", torch.float32)
    prompts = random_prompts(N, model.config.vocab_size, BATCH, torch.device("cpu"), 5)
    run = answers.runner(method, model, new=12)
    skip_prompt = method != "paper"  # a transformers streamer first receives the prompt
    warm, timed = (answers.TokenClock(torch.device("cpu"), skip_prompt) for _ in range(2))
    assert run(prompts, warm, 3) is None and len(warm.stamps) == 3
    if method == "transformers-static":  # the warm-up's static cache has the timed run's size
        assert model._previous_max_cache_length == N + 12
    stats = run(prompts, timed, None)
    assert len(timed.stamps) == 12 and timed.stamps == sorted(timed.stamps)
    assert stats is None if method != "paper" else [len(s.steps) for s in stats] == [12] * BATCH  # prefill + 11
