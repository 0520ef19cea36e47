"""The `lazyprefill` command line: it parses and prints; the engine and the timing protocol know nothing of it.

Every bad input ends in a one-line message that says what to pass instead, exit code 2, no traceback.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from .engine import DecodeOptions
    from .generation import GenerationOutput
    from .schedule import Preset, Schedule

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="LazyLLM dynamic token pruning for Hugging Face LLMs."
)

MODEL_HELP = "smollm2 (embedded default), gemma3-270m (embedded, 32K context), a local path or a hub name."
SCHEDULE_HELP = (
    'balanced (default), paper, none (dense), static, random, layer:ratio pairs "9:0.7,19:0.7" or a .json file.'
)
# What loading raises for what is not a model: a missing or invalid config.json or tokenizer (OSError,
# ValueError), an unknown model_type (KeyError, ValueError), weights that do not fit (RuntimeError), ...
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError)


def fail(message: str, option: str | None = None) -> NoReturn:
    """End the command with `message` about `option`: typer prints it in one panel, exit code 2."""
    raise typer.BadParameter(message, param_hint=option)


# ------------------------------------------------------------------ input checks
def read_document(path: Path) -> str:
    """The text of a prompt file, or a clear error if it is not UTF-8 text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        fail(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded): give a plain text file", "--prompt-file")
    if "\x00" in text:
        fail(f"{path} looks like a binary file (it holds NUL bytes): give a plain text file", "--prompt-file")
    return text


def check_device(device: str, dtype: str) -> None:
    """Refuse an unknown dtype, and a device this machine does not have, before anything loads."""
    import torch

    from .env import DTYPES

    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}", "--dtype")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        fail(f"unknown device {device!r}: use cpu or cuda (cuda:1 for a second GPU)", "--device")
    if kind == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available on this machine: use --device cpu", "--device")
    if kind not in ("cpu", "cuda"):
        fail(f"device {device!r} is not supported: use cpu or cuda", "--device")


def every_family_presets() -> dict[str, Preset]:
    """Every model family's presets by name: what a schedule may mean before the model is known."""
    from .adapters import ADAPTERS

    return {name: p for adapter in ADAPTERS.values() for name, p in adapter.presets.items()}


def check_schedule_syntax(schedule: str | None) -> None:
    """Refuse a schedule that cannot be parsed; its layers are checked once the model is known."""
    from .schedule import parse_schedule

    if schedule is None:
        return
    try:
        parse_schedule(schedule, num_layers=1 << 20, presets=every_family_presets())
    except ValueError as err:
        fail(str(err), "--schedule")


# DecodeOptions a server's steps read (`ahead` is generate's: a server reads each step's tokens before the next)
SERVE_DECODE_KEYS = ("graphs", "graph_layout", "split_kernel", "burst_kernel", "compile")


def decode_options(pairs: list[str], device: str) -> DecodeOptions:
    """`serve --decode KEY=on|off` pairs as DecodeOptions, checked against `device` before the model loads: each
    default is what measured fastest on the device, and these turn a decoding path off (or on) where it misbehaves
    or to measure what it gives."""
    import torch

    from .engine import DecodeOptions

    chosen: dict[str, bool] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in SERVE_DECODE_KEYS or value not in ("on", "off"):
            fail(f"{pair!r} is not KEY=on or KEY=off with KEY one of {', '.join(SERVE_DECODE_KEYS)}", "--decode")
        if key in chosen:
            fail(f"{key} is given twice", "--decode")
        chosen[key] = value == "on"
    try:
        options = DecodeOptions(**chosen)
        options.check(torch.device(device))
    except ValueError as err:
        fail(str(err), "--decode")
    return options


def schedule_files(pairs: list[str]) -> dict[str, Path]:
    """`serve --schedule-file NAME=FILE` pairs as {NAME: FILE}, each file read and checked before the model loads
    (its layers once it has). A NAME must not already mean a schedule, or it would hide one."""
    from .schedule import load_schedule, parse_schedule

    files: dict[str, Path] = {}
    presets = every_family_presets()
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not file:
            fail(f"{pair!r} is not NAME=FILE: give the name requests use, '=', and a schedule file "
                 "(mine=schedule.json)", "--schedule-file")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            fail(f"schedule name {name!r} must be letters, digits, '_' or '-'", "--schedule-file")
        if name in files:
            fail(f"schedule name {name!r} is given twice", "--schedule-file")
        try:
            parse_schedule(name, num_layers=1 << 20, presets=presets, files=False)
        except ValueError:
            pass
        else:
            fail(f"schedule name {name!r} already means a schedule (a preset, 'dense' or a scorer): choose another",
                 "--schedule-file")
        path = Path(file).expanduser()
        try:
            load_schedule(path)
        except (ValueError, OSError) as err:  # OSError: a file that cannot be read
            fail(str(err), "--schedule-file")
        files[name] = path
    return files


def join_ranks(tp: int) -> None:
    """--tp N: run this command again under torchrun with N processes, unless this is one of them (then check N)."""
    from . import parallel

    if tp > 1 and not parallel.launched():
        parallel.relaunch(tp, sys.argv[1:])
    if parallel.launched() and int(os.environ["WORLD_SIZE"]) != tp:
        fail(f"torchrun started {os.environ['WORLD_SIZE']} processes: pass --tp {os.environ['WORLD_SIZE']}", "--tp")


def load(model: str, device: str, dtype: str, tp: int = 1) -> tuple:
    """(model, tokenizer), or a clear error when `model` is not a causal LM that lazyprefill runs; with `tp` > 1,
    this rank's share of it (inside the torchrun job that `--tp` starts)."""
    from .generation import LazyLLM
    from .models import EMBEDDED, load_model

    where = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not where.exists():
        fail(f"{model} does not exist: pass smollm2, an existing model folder or .gguf file, or a hub name", "--model")
    if where.is_dir() and not (where / "config.json").is_file():
        fail(
            f"{model} has no config.json, so it is not a transformers checkpoint: pass smollm2, a folder that "
            "save_pretrained wrote, a .gguf file or a hub name",
            "--model",
        )
    try:
        lm, tokenizer = load_model(model, device=device, dtype=dtype, tp=tp)
    except LOAD_ERRORS as err:  # what transformers raises for a folder or name that is not a model it can load
        if model in EMBEDDED:  # the embedded model's own message says how to fetch or clear it
            fail(f"could not load {model!r}: {err}", "--model")
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        fail(
            f"could not load {model!r} ({reason}): pass smollm2, a folder that holds a transformers checkpoint "
            "(config.json and weights) or a .gguf file, or a hub model name",
            "--model",
        )
    try:
        LazyLLM(lm, None)  # the architecture check, before any work
    except ValueError as err:
        fail(str(err), "--model")
    return lm, tokenizer


def model_schedule(schedule: str | Path | None, model, option: str = "--schedule") -> Schedule:
    """The checked Schedule: the user's (given as `option`), or the default preset (whose failure is the model's),
    with the model family's presets placed on the layers it can prune at."""
    from .adapters import adapter_for
    from .schedule import DEFAULT_PRESET, parse_schedule

    a = adapter_for(model)
    try:
        return parse_schedule(
            DEFAULT_PRESET if schedule is None else schedule, a.num_layers, a.prunable_layers(), a.presets
        )
    except ValueError as err:
        fail(str(err), option if schedule is not None else "--model")


# ---------------------------------------------------------------------- inspect
@app.command("inspect")
def inspect_command(
    prompt_file: Path = typer.Option(..., "--prompt-file", exists=True, dir_okay=False, help="The document (text)."),
    model: str = typer.Option("smollm2", "--model", help=MODEL_HELP),
    question: str | None = typer.Option(None, "--question", help="Asked after the document."),
    schedule: str | None = typer.Option(None, "--schedule", help=SCHEDULE_HELP),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    out: Path = typer.Option(Path("report.html"), "--out", dir_okay=False, help="HTML report; PNGs go beside it."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Write an HTML report of what LazyLLM kept: each prompt token shaded by how deep the model read it."""
    import torch
    from rich.console import Console

    from .models import chat_prompt
    from .report import inspect_prompt, token_texts, write_report
    from .schedule import DEFAULT_PRESET

    document = read_document(prompt_file)
    check_device(device, dtype)
    check_schedule_syntax(schedule)
    console = Console(stderr=True)
    lm, tokenizer = load(model, device, dtype)
    sched = model_schedule(schedule, lm)
    ids = chat_prompt(tokenizer, document, question)
    with console.status(f"Running dense and LazyLLM on {len(ids)} prompt tokens..."):
        try:
            lazy, dense = inspect_prompt(lm, tokenizer, torch.tensor(ids, device=lm.device), sched, max_new_tokens)
        except ValueError as err:  # the request's checks, made before any prefill
            fail(str(err), "--prompt-file")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_report(
        out,
        lazy,
        token_texts(tokenizer, ids),
        model=f"{model} ({device}, {dtype})",
        schedule=sched,
        schedule_name=schedule or DEFAULT_PRESET,
        dense=dense,
    )
    console.print(
        f"TTFT LazyLLM {lazy.ttft_s * 1000:.0f} ms, dense {dense.ttft_s * 1000:.0f} ms "
        f"({dense.ttft_s / lazy.ttft_s:.2f}x); wrote {', '.join(str(p) for p in written)}"
    )


# --------------------------------------------------------------------- generate
@app.command("generate")
def generate_command(
    prompt_files: list[Path] = typer.Option(
        ...,
        "--prompt-file",
        "-f",
        exists=True,
        dir_okay=False,
        readable=True,
        help="The document (text). Repeat it to answer several documents as one batch.",
    ),
    model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
    question: str | None = typer.Option(None, "--question", "-q", help="Asked after each document."),
    schedule: str | None = typer.Option(None, "--schedule", "-s", help=SCHEDULE_HELP),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    compare: bool = typer.Option(False, "--compare", help="Also run dense and report both answers and TTFTs."),
    repeats: int | None = typer.Option(
        None, "--repeats", min=1, help="Timed runs per method, median TTFT reported (default 3 with --compare, else 1)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    tp: int = typer.Option(
        1, "--tp", min=1, help="Tensor-parallel ranks: N processes under torchrun (started here unless this already "
        "runs under it), each with 1/N of the heads and MLP; rank 0 prints."
    ),
) -> None:
    """Answer a question about a document with LazyLLM, and time the first token (TTFT).

    Several --prompt-file options run as one batch: each document is pruned on its own, and the TTFT
    is the whole batch's.
    """
    from rich.console import Console

    from . import parallel
    from .bench import time_methods
    from .generation import LazyLLM
    from .models import chat_prompt
    from .schedule import DEFAULT_PRESET

    documents = [read_document(path) for path in prompt_files]
    for path, document in zip(prompt_files, documents):
        if not document.strip() and not (question or "").strip():
            fail(f"{path} is empty and no --question was given", "--prompt-file")
    check_device(device, dtype)
    check_schedule_syntax(schedule)
    repeats = repeats or (3 if compare else 1)
    join_ranks(tp)
    lm, tokenizer = load(model, device, dtype, tp)
    sched = model_schedule(schedule, lm)
    prompts = [chat_prompt(tokenizer, document, question) for document in documents]
    methods = {"lazy": LazyLLM(lm, sched, tokenizer=tokenizer)}
    if compare:
        methods["dense"] = LazyLLM(lm, None, tokenizer=tokenizer)
    n_tokens = sum(len(p) for p in prompts)
    what = f"{n_tokens} tokens" if len(prompts) == 1 else f"{len(prompts)} prompts, {n_tokens} tokens"
    with Console(stderr=True).status(f"Prefill of {what}...") as status:
        try:
            outputs, ttfts = time_methods(
                methods, prompts, max_new_tokens, repeats, lambda label: status.update(f"Prefill of {what}, {label}...")
            )
        except ValueError as err:  # the request's checks, made before any prefill
            fail(str(err), "--prompt-file")
    run = GenerateRun(
        model,
        schedule or DEFAULT_PRESET,
        sched,
        device,
        dtype,
        max_new_tokens,
        repeats,
        lm.config.num_hidden_layers,
        [str(p) for p in prompt_files],
        prompts,
        outputs,
        ttfts,
    )
    if not parallel.is_main():
        return
    if json_out:
        print_json(run)
    else:
        print_table(run, what)


@dataclass
class GenerateRun:
    """What `generate` measured, ready to print: the request, the first round's answers, the TTFTs."""

    model: str
    schedule_name: str
    schedule: Schedule
    device: str
    dtype: str
    max_new_tokens: int
    repeats: int
    num_layers: int
    prompt_files: list[str]
    prompts: list[list[int]]
    outputs: dict[str, list[GenerationOutput]]  # method -> one output per prompt, from the first round
    ttfts: dict[str, list[float]]  # method -> TTFT of every round

    @property
    def compare(self) -> bool:
        return "dense" in self.outputs

    @property
    def ttft(self) -> dict[str, float]:
        """The median TTFT of each method."""
        return {name: statistics.median(times) for name, times in self.ttfts.items()}

    def answers(self) -> list[dict]:
        """One dict per prompt file: its answer, and the prefill work LazyLLM did (share of dense rows)."""
        answers = []
        for i, (path, prompt, lazy) in enumerate(zip(self.prompt_files, self.prompts, self.outputs["lazy"])):
            answer = {
                "prompt_file": path,
                "prompt_tokens": len(prompt),
                "text": lazy.text,
                "token_ids": lazy.new_tokens,
                "finish_reason": lazy.finish_reason,
                "prefill_computed": lazy.stats.prefill_computed,
                "prefill_work": lazy.stats.prefill_work,
            }
            if self.compare:
                dense = self.outputs["dense"][i]
                answer |= {"dense_text": dense.text, "dense_token_ids": dense.new_tokens}
            answers.append(answer)
        return answers


def print_json(run: GenerateRun) -> None:
    """One JSON object: the request, the TTFTs and, for one prompt, its answer's fields at the top."""
    import json

    result = {
        "model": run.model,
        "schedule": run.schedule_name,
        "schedule_keep": {str(layer): ratio for layer, ratio in run.schedule.keep.items()},
        "schedule_scorer": run.schedule.scorer.spec(),
        "batch_size": len(run.prompts),
        "max_new_tokens": run.max_new_tokens,
        "device": run.device,
        "dtype": run.dtype,
        "repeats": run.repeats,
        "ttft_s": run.ttft["lazy"],
        "ttft_runs_s": run.ttfts["lazy"],
    }
    if run.compare:
        result |= {
            "dense_ttft_s": run.ttft["dense"],
            "dense_ttft_runs_s": run.ttfts["dense"],
            "speedup": run.ttft["dense"] / run.ttft["lazy"],
        }
    answers = run.answers()
    result |= answers[0] if len(answers) == 1 else {"answers": answers}
    typer.echo(json.dumps(result))


def print_table(run: GenerateRun, what: str) -> None:
    """The answers as text, then a table of TTFT, prefill work and new tokens per method."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    label = f"LazyLLM ({escape(run.schedule_name)})"
    console.print(
        f"[bold]{escape(run.model)}[/bold] on {run.device} ({run.dtype}), {what}, "
        f"TTFT as the median of {run.repeats} run{'s' if run.repeats > 1 else ''}"
    )
    answers = run.answers()
    for answer in answers:
        if len(answers) > 1:
            console.print(f"\n[bold]{escape(answer['prompt_file'])}[/bold] ({answer['prompt_tokens']} tokens)")
        console.print(f"\n[bold]{label}[/bold]: {escape(answer['text'].strip())}")
        if run.compare:
            console.print(f"\n[bold]Dense[/bold]: {escape(answer['dense_text'].strip())}")
    n_tokens = sum(len(p) for p in run.prompts)
    work = sum(sum(o.stats.prefill_computed) for o in run.outputs["lazy"]) / (run.num_layers * n_tokens)
    table = Table("method", "TTFT", "prefill work", "new tokens")
    if run.compare:
        new = sum(len(o.new_tokens) for o in run.outputs["dense"])
        table.add_row("dense", f"{run.ttft['dense']:.3f} s", "100%", str(new))
    new = sum(len(o.new_tokens) for o in run.outputs["lazy"])
    table.add_row(label, f"{run.ttft['lazy']:.3f} s", f"{work:.0%}", str(new))
    console.print()
    console.print(table)
    if run.compare:
        console.print(f"TTFT speedup: [bold]{run.ttft['dense'] / run.ttft['lazy']:.2f}x[/bold]")


# ------------------------------------------------------------------------- eval
@app.command("eval")
def eval_command(
    model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
    tasks: str = typer.Option(
        "code,recall,passkey",
        "--tasks",
        help="Comma-separated: code, recall, passkey, fidelity, and RULER's niah_single, niah_multikey, "
        "niah_multivalue, niah_multiquery, vt, cwe, fwe.",
    ),
    samples: int = typer.Option(5, "--samples", min=1, help="Samples per task and length."),
    lengths: str = typer.Option("512", "--lengths", help="Prompt lengths in tokens, comma-separated."),
    schedules: str = typer.Option(
        "presets",
        "--schedules",
        help='Schedules, comma-separated (commas inside a scorer\'s parentheses stay): "presets" (all presets), '
        '"sweep" (the built-in speed sweep), a preset name, layer:ratio pairs joined by ";" ("9:0.7;19:0.7"), either '
        'after a scorer ("pool(k=7, of=window(w=16)):paper", "static:paper"), or a schedule file.',
    ),
    baselines: str = typer.Option(
        "all",
        "--baselines",
        help='Schedules that also get static and random: "all", "none", or a list like --schedules.',
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Rebuild the report from OUT/records.jsonl (complete samples only), run nothing."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Keep the samples an earlier run of the same evaluation in OUT completed; run the rest."
    ),
    split: str = typer.Option(
        "evaluation", "--split", help="calibration (choose presets on it) or evaluation (report them on it)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Builds the task samples (default: the split's seed)."),
    out: Path = typer.Option(Path("results/eval"), "--out", file_okay=False, help="Report directory."),
    cache: Path | None = typer.Option(
        None, "--cache", file_okay=False, help="Dense-result cache (default: OUT/dense-cache)."
    ),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Score LazyLLM, static and random pruning against dense on offline long-context tasks."""
    from rich.console import Console
    from rich.table import Table

    from .adapters import adapter_for
    from .eval import EvalConfig, ResumeMismatch, evaluate, make_methods, report_from_log
    from .schedule import split_list

    try:
        cfg = EvalConfig(
            model=model,
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
            samples=samples,
            lengths=tuple(int(n) for n in lengths.split(",")),
            split=split,
            seed=seed,
            out_dir=out,
            schedules=tuple(split_list(schedules)),
            baselines=None if baselines == "all" else () if baselines == "none" else tuple(split_list(baselines)),
            cache_dir=cache,
            device=device,
            dtype=dtype,
            threads=threads,
            resume=resume,
        )
    except ValueError as err:
        fail(str(err))
    if report_only:
        missing = [name for name in ("config.json", "records.jsonl") if not (out / name).is_file()]
        if missing:
            fail(f"{out} holds no eval run ({' and '.join(missing)} missing): run without --report-only first", "--out")
        result = report_from_log(out, cfg.tolerances)
    else:
        check_device(device, dtype)
        lm, _ = load(model, device, dtype)
        try:
            a = adapter_for(lm)
            make_methods(cfg.schedules, a.num_layers, cfg.baselines, a.prunable_layers(), a.presets)
        except ValueError as err:
            fail(str(err), "--schedules / --baselines")
        try:
            result = evaluate(cfg)
        except ResumeMismatch as err:
            fail(str(err), "--resume")
    console = Console()
    table = Table("task", "method", "score [95% CI]", "n", "vs dense [95% CI]", "speedup", "ideal")
    for task, methods in result["summary"].items():
        for name, s in methods.items():
            sc, d = s["score"], s["diff_vs_dense"]
            table.add_row(
                task,
                name,
                f"{sc['mean']:.3f} [{sc['ci95'][0]:.3f}, {sc['ci95'][1]:.3f}]",
                str(sc["n"]),
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                f"{s['speedup']:.2f}x",
                f"{s['ideal_speedup']:.2f}x",
            )
    console.print(table)
    for name, p in result["presets"].items():
        console.print(f"{name}: {p['schedule'] or 'no schedule within ' + format(p['tolerance'], '.0%')}")
    console.print(f"wrote {out / 'eval.json'} (summary), {out / 'records.jsonl'} (every record), {out / 'eval.md'} "
                  "and one PNG per task")


@app.command("bench")
def bench_command(
    preset: str = typer.Option("cpu", help="gpu (llama2-7b and llama3-8b shapes, random bf16 weights), cpu (smollm2)"),
    model: str = typer.Option(None, help="comma-separated: a shape (llama2-7b, llama3-8b, tiny), smollm2 or a path"),
    lengths: str = typer.Option(None, help="prompt lengths for every model, e.g. 1024,2048 (default: the preset's)"),
    decode_lengths: str = typer.Option(None, help="prompts after which 128 decoding steps are timed ('' for none)"),
    repeats: int = typer.Option(None, help="timed runs per method and length (median reported)"),
    batch_sizes: str = typer.Option(None, help="batched TTFT and decoding at --batch-length, e.g. 1,4,8 ('' for none)"),
    batch_length: int = typer.Option(None, min=2, help="prompt tokens of every sequence of a batch"),
    out: Path = typer.Option(Path("benchmarks/results"), help="folder for the JSON, markdown table and PNG plot"),
    stem: str = typer.Option(None, help="output file name without extension (default: the preset's name)"),
) -> None:
    """Time TTFT and decoding: plain transformers, lazyprefill dense and every schedule preset."""
    from tqdm import tqdm

    from . import bench

    def ints(text: str | None) -> list[int] | None:
        return None if text is None else [int(x) for x in text.split(",") if x.strip()]

    try:
        cfg = bench.configure(
            preset,
            model.split(",") if model else None,
            ints(lengths),
            ints(decode_lengths),
            repeats,
            batch_sizes=ints(batch_sizes),
            batch_length=batch_length,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    with tqdm(total=bench.progress_total(cfg), desc="bench") as bar:

        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        result = bench.run(cfg, progress)
    paths = bench.write(result, out, stem or preset)
    typer.echo(bench.markdown(result))
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("tune")
def tune_command(
    model: str = typer.Option(
        "smollm2", "--model", "-m", help=MODEL_HELP
    ),
    target_loss: float | None = typer.Option(
        None,
        "--target-loss",
        help="Largest relative loss per task vs dense, e.g. 0.05: the fastest schedule within it.",
    ),
    target_speedup: float | None = typer.Option(
        None, "--target-speedup", help="Smallest ideal prefill speedup, e.g. 2.0: the most accurate schedule at it."
    ),
    out: Path = typer.Option(Path("schedule.json"), "--out", dir_okay=False, help="The schedule file to write."),
    tasks: str = typer.Option("code,recall,passkey", "--tasks", help="Calibration tasks, comma-separated."),
    lengths: str = typer.Option("512", "--lengths", help="Prompt lengths in tokens, comma-separated."),
    samples: int = typer.Option(20, "--samples", min=2, help="Calibration samples per task and length."),
    scorers: str | None = typer.Option(
        None,
        "--scorers",
        help='Scorers to try, comma-separated ("last, pool(k=7, of=window(w=16))") (default: '
        "last, pooled last, pool over window, protect around it).",
    ),
    fractions: str = typer.Option(
        "0.1,0.2,0.34,0.5,0.67", "--fractions", help="Depth fractions a pruning layer may sit at."
    ),
    ratios: str = typer.Option(
        "0.7,0.5,0.3", "--ratios", help="Keep ratios to try (one per schedule, at each of its layers)."
    ),
    max_layers: int = typer.Option(2, "--max-layers", help="At most this many pruning layers."),
    rule: str = typer.Option(
        "bound", "--rule", help="bound: the 95% bound of the paired loss meets --target-loss; mean: its mean."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Builds the calibration prompts (default: the calibration split's)."
    ),
    eval_samples: int = typer.Option(
        100,
        "--eval-samples",
        help="Evaluation samples per task: calibration prompts found among them are dropped; --holdout scores on them.",
    ),
    holdout: bool = typer.Option(
        False,
        "--holdout",
        help="Leave one family out: also choose with each task left out and score that choice on the task's "
        "evaluation split; writes WORK_DIR/holdout-OUT.json and .md.",
    ),
    work_dir: Path | None = typer.Option(
        None,
        "--work-dir",
        file_okay=False,
        help="Records (JSONL, resumable), the log and the plot (default: OUT without .json + '-tune').",
    ),
    cache: Path | None = typer.Option(
        None, "--cache", file_okay=False, help="Dense-result cache (default: WORK_DIR/dense-cache)."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Decide from WORK_DIR/records.jsonl alone, run nothing (a search stopped early)."
    ),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Search pruning layers, keep ratios and scorers on calibration prompts; write the chosen schedule file."""
    from rich.console import Console

    from . import tune
    from .eval.tasks import SPLITS
    from .schedule import split_list

    try:
        space = tune.SearchSpace(
            scorers=tuple(split_list(scorers)) if scorers else tune.DEFAULT_SCORERS,
            fractions=tuple(float(x) for x in fractions.split(",") if x.strip()),
            ratios=tuple(float(x) for x in ratios.split(",") if x.strip()),
            max_layers=max_layers,
        )
        cfg = tune.TuneConfig(
            model=model,
            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
            lengths=tuple(int(n) for n in lengths.split(",")),
            samples=samples,
            seed=SPLITS["calibration"] if seed is None else seed,
            eval_samples=eval_samples,
            target=tune.Target(max_loss=target_loss, min_speedup=target_speedup, rule=rule),
            space=space,
            work_dir=work_dir or out.with_name(out.stem + "-tune"),
            cache_dir=cache,
            device=device,
            dtype=dtype,
            threads=threads,
            run=not report_only,
            holdout=holdout,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    try:
        result = tune.tune(cfg)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    console = Console()
    console.print(tune.front_table(result))
    log = tune.write_log(result, cfg, cfg.work_dir / f"tune-{out.stem}.json")
    png = tune.plot(result, cfg.work_dir / f"front-{out.stem}.png", f"lazyprefill tune: {model}, {lengths} tokens")
    console.print(f"wrote {log} and {png}")
    if result.holdout:
        paths = tune.write_holdout(result, cfg, cfg.work_dir / f"holdout-{out.stem}.json")
        typer.echo(paths[1].read_text())
        console.print(f"wrote {paths[0]} and {paths[1]}")
    if result.chosen is None:
        console.print(
            f"[red]no candidate meets the target[/red] ({cfg.target}); the front above is what the "
            "search space reaches: widen it (--ratios, --fractions, --scorers) or relax the target"
        )
        raise typer.Exit(1)
    num_layers = len(result.chosen.candidate.computed)
    tune.save_schedule(result, cfg, num_layers, out)
    console.print(f"chose [bold]{result.chosen.candidate.name}[/bold] ({result.chosen.ideal:.2f}x ideal); wrote {out}")
    if result.holdout:
        console.print("its calibration scores saw every task: quote accuracy from the held-out rows above")


# ------------------------------------------------------------------------ serve
@app.command("serve")
def serve_command(
    model: str = typer.Option("smollm2", "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
    schedule: str | None = typer.Option(None, "--schedule", "-s", help="Default schedule: " + SCHEDULE_HELP),
    schedule_file: list[str] | None = typer.Option(
        None, "--schedule-file", metavar="NAME=FILE", help="A schedule file that requests ask for by NAME (they may "
        "not give a path); read at start. Repeatable."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Requests decoding together under one schedule."),
    max_prompt_tokens: int | None = typer.Option(
        None, "--max-prompt-tokens", min=1, help="Longest prompt taken (default: the model's positions less "
        "--max-new-tokens)."
    ),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="The most max_tokens a request may ask."),
    kv_budget_gb: float | None = typer.Option(
        None, "--kv-budget-gb", min=0.001, help="K/V cache memory for all requests; what does not fit waits "
        "(default: --max-batch slots per schedule in use)."
    ),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests beyond this are refused (429)."),
    min_reuse_tokens: int = typer.Option(
        32, "--min-reuse-tokens", min=0, help="Shortest cached prefix a prompt reuses instead of prefilling it (0: "
        "never); cached prefixes share --kv-budget-gb with the slots."
    ),
    reuse_pruned: bool = typer.Option(
        False, "--reuse-pruned", help="Also continue cached prefixes under pruning (otherwise only where nothing is "
        "pruned, which is exact); a continued pruned prefix can answer otherwise than a fresh prefill."
    ),
    max_request_bytes: int = typer.Option(
        16 * 2**20, "--max-request-bytes", min=1, help="Larger request bodies are refused (413) before they are "
        "parsed (16 MiB; a 128K-token prompt is about 1 MB)."
    ),
    tp: int = typer.Option(
        1, "--tp", min=1, help="Tensor-parallel ranks: N processes under torchrun (started here unless this already "
        "runs under it), each with 1/N of the heads and MLP; rank 0 serves HTTP and the others step with it."
    ),
    decode: list[str] | None = typer.Option(
        None, "--decode", metavar="KEY=on|off", help=f"A decoding path on or off ({', '.join(SERVE_DECODE_KEYS)}; "
        "default: what measured fastest on the device). Repeatable."
    ),
    warmup: bool = typer.Option(
        True, "--warmup/--no-warmup", help="Serve one request of the default schedule before listening, so that "
        "the first client does not wait for the compiles and kernels a process builds once (seconds on a GPU)."
    ),
) -> None:
    """Serve the model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics),
    with continuous batching: requests join the running batch between decoding steps."""
    try:
        import uvicorn

        from .server import create_app
        from .serving import Scheduler, ServeConfig
    except ImportError as err:
        fail(f"serving needs FastAPI and uvicorn ({err.name} is missing): pip install 'lazyprefill[serve]'")
    from rich.console import Console

    from . import mirror, parallel
    from .adapters import adapter_for
    from .schedule import DEFAULT_PRESET

    check_device(device, dtype)
    check_schedule_syntax(schedule)
    files = schedule_files(schedule_file or [])
    options = decode_options(decode or [], device)
    join_ranks(tp)
    lm, tokenizer = load(model, device, dtype, tp)
    model_schedule(schedule, lm)  # refuses a schedule this model cannot run, before the server starts
    named = {name: model_schedule(file, lm, f"--schedule-file {name}") for name, file in files.items()}
    group = mirror.control_group() if tp > 1 else None
    if not parallel.is_main():
        mirror.Follower(adapter_for(lm), group).run()
        return
    leader = mirror.Leader(group) if group is not None else None
    try:
        config = ServeConfig(schedule=schedule or DEFAULT_PRESET, max_batch=max_batch,
                             max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                             kv_budget_gb=kv_budget_gb, max_queue=max_queue, min_reuse_tokens=min_reuse_tokens,
                             reuse_pruned=reuse_pruned, schedules=named)
        scheduler = Scheduler(lm, tokenizer, config, options, make_engine=None if leader is None else leader.engine)
    except ValueError as err:
        fail(str(err))
    registered = f"; registered: {', '.join(named)}" if named else ""
    console = Console(stderr=True)
    try:
        if warmup:
            try:
                seconds = scheduler.warm_up()
            except RuntimeError as err:
                fail(str(err))
            console.print(f"warmed up in {seconds:.1f} s")
        console.print(f"serving {model} ({config.schedule}{registered}) on http://{host}:{port}/v1")
        uvicorn.run(create_app(scheduler, model, max_request_bytes), host=host, port=port, log_level="warning")
    finally:
        scheduler.close()
        if leader is not None:
            leader.stop()


# ---------------------------------------------------------------------- lm-eval
# Every argument goes to lm-eval's own parser, --help included
@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with the `lazyprefill` model: `lazyprefill lm-eval --model lazyprefill
    --model_args pretrained=PATH,schedule=balanced --tasks TASK`, any of lm_eval's arguments."""
    try:
        from .lm_eval_model import main
    except ImportError as err:
        fail(f"this command needs lm-evaluation-harness ({err.name} is missing): pip install 'lazyprefill[lm-eval]'")
    main(ctx.args)
