"""The `lazyprefill` command line. Each command lives in its own function; the engine knows nothing of it."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LazyLLM dynamic token pruning for Hugging Face LLMs.")


@app.command("inspect")
def inspect_command(
    prompt_file: Path = typer.Option(..., "--prompt-file", exists=True, dir_okay=False, help="The document (text)."),
    model: str = typer.Option("smollm2", "--model", help="smollm2 (embedded default), a local path or a hub name."),
    question: str | None = typer.Option(None, "--question", help="Asked after the document."),
    schedule: str = typer.Option("paper", "--schedule", help='paper, static, random or "9:0.7,19:0.7".'),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    out: Path = typer.Option(Path("report.html"), "--out", dir_okay=False, help="HTML report; PNGs go beside it."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Write an HTML report of what LazyLLM kept: each prompt token shaded by how deep the model read it."""
    import torch
    from rich.console import Console

    from .models import chat_prompt, load_model
    from .report import inspect_prompt, token_texts, write_report
    from .schedule import parse_schedule

    console = Console(stderr=True)
    lm, tokenizer = load_model(model, device=device, dtype=dtype)
    ids = chat_prompt(tokenizer, prompt_file.read_text(encoding="utf-8"), question)
    sched = parse_schedule(schedule, lm.config.num_hidden_layers)
    with console.status(f"Running dense and LazyLLM on {len(ids)} prompt tokens..."):
        lazy, dense = inspect_prompt(lm, tokenizer, torch.tensor(ids, device=lm.device), sched, max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = write_report(
        out, lazy, token_texts(tokenizer, ids), model=f"{model} ({device}, {dtype})", schedule=sched,
        schedule_name=schedule, dense=dense,
    )
    console.print(
        f"TTFT LazyLLM {lazy.ttft_s * 1000:.0f} ms, dense {dense.ttft_s * 1000:.0f} ms "
        f"({dense.ttft_s / lazy.ttft_s:.2f}x); wrote {', '.join(str(p) for p in written)}"
    )


@app.command("generate")
def generate_command(
    prompt_files: list[Path] = typer.Option(
        ..., "--prompt-file", "-f", exists=True, dir_okay=False, readable=True,
        help="The document (text). Repeat it to answer several documents as one batch.",
    ),
    model: str = typer.Option("smollm2", "--model", "-m", help="smollm2 (embedded default), a local path or hub name."),
    question: str | None = typer.Option(None, "--question", "-q", help="Asked after each document."),
    schedule: str = typer.Option(
        "paper", "--schedule", "-s", help='paper, none (dense), static, random or layer:ratio pairs "9:0.7,19:0.7".'
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    compare: bool = typer.Option(False, "--compare", help="Also run dense and report both answers and TTFTs."),
    repeats: int | None = typer.Option(
        None, "--repeats", min=1, help="Timed runs per method, median TTFT reported (default 3 with --compare, else 1)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
) -> None:
    """Answer a question about a document with LazyLLM, and time the first token (TTFT).

    Several --prompt-file options run as one batch: each document is pruned on its own, and the TTFT
    is the whole batch's.
    """
    import json
    import statistics

    import torch
    from rich.console import Console
    from rich.markup import escape

    from .generation import LazyLLM
    from .models import DTYPES, chat_prompt, load_model
    from .schedule import parse_schedule

    if dtype not in DTYPES:
        raise typer.BadParameter(f"use one of {', '.join(DTYPES)}", param_hint="--dtype")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    documents = [path.read_text(encoding="utf-8") for path in prompt_files]
    for path, document in zip(prompt_files, documents):
        if not document.strip() and not (question or "").strip():
            raise typer.BadParameter(f"{path} is empty and no --question was given", param_hint="--prompt-file")
    try:
        parse_schedule(schedule, num_layers=1 << 20)  # syntax only; layer ranges are checked once the model is known
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--schedule") from None
    repeats = repeats or (3 if compare else 1)

    console = Console(stderr=True)
    try:
        lm, tokenizer = load_model(model, device=device, dtype=dtype)
    except (OSError, RuntimeError) as err:
        console.print(f"[red]Error:[/red] could not load {model!r}: {escape(str(err))}", highlight=False)
        raise typer.Exit(1) from None
    try:
        sched = parse_schedule(schedule, lm.config.num_hidden_layers)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--schedule") from None
    prompts = [chat_prompt(tokenizer, document, question) for document in documents]
    n_tokens = sum(len(p) for p in prompts)
    what = f"{n_tokens} tokens" if len(prompts) == 1 else f"{len(prompts)} prompts, {n_tokens} tokens"

    try:
        methods = {"lazy": LazyLLM(lm, sched, tokenizer=tokenizer)}
    except ValueError as err:  # an architecture lazyprefill has no adapter for
        raise typer.BadParameter(str(err), param_hint="--model") from None
    if compare:
        methods["dense"] = LazyLLM(lm, None, tokenizer=tokenizer)
    outputs, ttfts = {}, {name: [] for name in methods}
    try:
        with console.status("Warming up: one untimed prefill of each method..."):
            for llm in methods.values():  # the first run at a new length pays one-off allocation costs
                llm.generate(prompts, max_new_tokens=1)  # a batch, of one for one file
        for run in range(repeats):  # interleaved, so a noisy neighbour slows both methods alike
            for name, llm in methods.items():
                label = f"{name} ({schedule})" if name == "lazy" else name
                with console.status(f"Prefill of {what}, {label}, run {run + 1}/{repeats}..."):
                    out = llm.generate(prompts, max_new_tokens=max_new_tokens if run == 0 else 1)
                outputs.setdefault(name, out)  # the first run makes the answers; later runs time TTFT only
                ttfts[name].append(out[0].ttft_s)  # one TTFT for the whole batch
    except ValueError as err:  # the engine's input checks, e.g. a prompt longer than the model takes
        raise typer.BadParameter(str(err), param_hint="--prompt-file") from None
    ttft = {name: statistics.median(times) for name, times in ttfts.items()}

    num_layers = lm.config.num_hidden_layers
    answers = []
    for i, (path, prompt, lazy) in enumerate(zip(prompt_files, prompts, outputs["lazy"])):
        answer = {
            "prompt_file": str(path),
            "prompt_tokens": len(prompt),
            "text": lazy.text,
            "token_ids": lazy.new_tokens,
            "finish_reason": lazy.finish_reason,
            "prefill_computed": lazy.stats.prefill_computed,
            "prefill_work": sum(lazy.stats.prefill_computed) / (num_layers * len(prompt)),  # share of dense rows
        }
        if compare:
            answer |= {"dense_text": outputs["dense"][i].text, "dense_token_ids": outputs["dense"][i].new_tokens}
        answers.append(answer)
    if json_out:
        result = {
            "model": model,
            "schedule": schedule,
            "schedule_keep": {str(layer): ratio for layer, ratio in sched.keep.items()},
            "schedule_scorer": sched.scorer.spec(),
            "batch_size": len(prompts),
            "max_new_tokens": max_new_tokens,
            "device": device,
            "dtype": dtype,
            "repeats": repeats,
            "ttft_s": ttft["lazy"],
            "ttft_runs_s": ttfts["lazy"],
        }
        if compare:
            result |= {
                "dense_ttft_s": ttft["dense"],
                "dense_ttft_runs_s": ttfts["dense"],
                "speedup": ttft["dense"] / ttft["lazy"],
            }
        result |= answers[0] if len(answers) == 1 else {"answers": answers}  # one prompt: its fields at the top
        typer.echo(json.dumps(result))
        return

    from rich.table import Table

    out_console = Console(highlight=False)
    out_console.print(
        f"[bold]{escape(model)}[/bold] on {device} ({dtype}), {what}, "
        f"TTFT as the median of {repeats} run{'s' if repeats > 1 else ''}"
    )
    for answer in answers:
        if len(answers) > 1:
            out_console.print(f"\n[bold]{escape(answer['prompt_file'])}[/bold] ({answer['prompt_tokens']} tokens)")
        out_console.print(f"\n[bold]LazyLLM ({escape(schedule)})[/bold]: {escape(answer['text'].strip())}")
        if compare:
            out_console.print(f"\n[bold]Dense[/bold]: {escape(answer['dense_text'].strip())}")
    work = sum(sum(o.stats.prefill_computed) for o in outputs["lazy"]) / (num_layers * n_tokens)
    table = Table("method", "TTFT", "prefill work", "new tokens")
    if compare:
        new = sum(len(o.new_tokens) for o in outputs["dense"])
        table.add_row("dense", f"{ttft['dense']:.3f} s", "100%", str(new))
    new = sum(len(o.new_tokens) for o in outputs["lazy"])
    table.add_row(f"LazyLLM ({escape(schedule)})", f"{ttft['lazy']:.3f} s", f"{work:.0%}", str(new))
    out_console.print()
    out_console.print(table)
    if compare:
        out_console.print(f"TTFT speedup: [bold]{ttft['dense'] / ttft['lazy']:.2f}x[/bold]")


@app.command("eval")
def eval_command(
    model: str = typer.Option("smollm2", "--model", "-m", help="smollm2 (embedded default), a local path or a hub name."),
    tasks: str = typer.Option("code,recall,passkey", "--tasks", help="Comma-separated: code, recall, passkey, fidelity."),
    samples: int = typer.Option(5, "--samples", min=1, help="Samples per task and length."),
    lengths: str = typer.Option("512", "--lengths", help="Prompt lengths in tokens, comma-separated."),
    schedules: str = typer.Option(
        "presets", "--schedules",
        help='Schedules, comma-separated (commas inside a scorer\'s parentheses stay): "presets" (all presets), '
        '"sweep" (the built-in speed sweep), a preset name, layer:ratio pairs joined by ";" ("9:0.7;19:0.7"), either '
        'after a scorer ("pool(k=7, of=window(w=16)):paper", "static:paper"), or a schedule file.',
    ),
    baselines: str = typer.Option(
        "all", "--baselines", help='Schedules that also get static and random: "all", "none", or a list like --schedules.'
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads [default: torch's]."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Rebuild the report from OUT/records.jsonl (complete samples only), run nothing."
    ),
    split: str = typer.Option(
        "evaluation", "--split", help="calibration (choose presets on it) or evaluation (report them on it)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Builds the task samples [default: the split's seed]."),
    out: Path = typer.Option(Path("results/eval"), "--out", file_okay=False, help="Report directory."),
    cache: Path | None = typer.Option(None, "--cache", file_okay=False, help="Dense-result cache [default: OUT/dense-cache]."),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Score LazyLLM, static and random pruning against dense on offline long-context tasks."""
    from rich.console import Console
    from rich.table import Table

    from .eval import EvalConfig, evaluate, report_from_log
    from .eval.runner import split_list

    try:
        cfg = EvalConfig(
            model=model, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), samples=samples,
            lengths=tuple(int(n) for n in lengths.split(",")), split=split, seed=seed, out_dir=out,
            schedules=tuple(split_list(schedules)),
            baselines=None if baselines == "all" else () if baselines == "none" else tuple(split_list(baselines)),
            cache_dir=cache, device=device, dtype=dtype, threads=threads,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    result = report_from_log(out, cfg.tolerances) if report_only else evaluate(cfg)
    console = Console()
    table = Table("task", "method", "score [95% CI]", "n", "vs dense [95% CI]", "speedup", "ideal")
    for task, methods in result["summary"].items():
        for name, s in methods.items():
            sc, d = s["score"], s["diff_vs_dense"]
            table.add_row(
                task, name, f"{sc['mean']:.3f} [{sc['ci95'][0]:.3f}, {sc['ci95'][1]:.3f}]", str(sc["n"]),
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", f"{s['speedup']:.2f}x",
                f"{s['ideal_speedup']:.2f}x",
            )
    console.print(table)
    for name, p in result["presets"].items():
        console.print(f"{name}: {p['schedule'] or 'no schedule within ' + format(p['tolerance'], '.0%')}")
    console.print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and one PNG per task")


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
            preset, model.split(",") if model else None, ints(lengths), ints(decode_lengths), repeats,
            batch_sizes=ints(batch_sizes), batch_length=batch_length,
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
    model: str = typer.Option("smollm2", "--model", "-m", help="smollm2 (embedded default), a local path or a hub name."),
    target_loss: float | None = typer.Option(
        None, "--target-loss", help="Largest relative loss per task vs dense, e.g. 0.05: the fastest schedule within it."
    ),
    target_speedup: float | None = typer.Option(
        None, "--target-speedup", help="Smallest ideal prefill speedup, e.g. 2.0: the most accurate schedule at it."
    ),
    out: Path = typer.Option(Path("schedule.json"), "--out", dir_okay=False, help="The schedule file to write."),
    tasks: str = typer.Option("code,recall,passkey", "--tasks", help="Calibration tasks, comma-separated."),
    lengths: str = typer.Option("512", "--lengths", help="Prompt lengths in tokens, comma-separated."),
    samples: int = typer.Option(20, "--samples", min=2, help="Calibration samples per task and length."),
    scorers: str | None = typer.Option(
        None, "--scorers", help='Scorers to try, comma-separated ("last, pool(k=7, of=window(w=16))") [default: '
        "last, pool over window, protect around it]."
    ),
    fractions: str = typer.Option("0.1,0.2,0.34,0.5,0.67", "--fractions", help="Depth fractions a pruning layer may sit at."),
    ratios: str = typer.Option("0.7,0.5,0.3", "--ratios", help="Keep ratios to try (one per schedule, at each of its layers)."),
    max_layers: int = typer.Option(2, "--max-layers", help="At most this many pruning layers."),
    rule: str = typer.Option("bound", "--rule", help="bound: the 95% bound of the paired loss meets --target-loss; mean: its mean."),
    seed: int | None = typer.Option(None, "--seed", help="Builds the calibration prompts [default: the calibration split's]."),
    eval_samples: int = typer.Option(100, "--eval-samples", help="Calibration prompts found among this many evaluation "
                                     "samples per task are dropped."),
    work_dir: Path | None = typer.Option(None, "--work-dir", file_okay=False,
                                         help="Records (JSONL, resumable), the log and the plot [default: OUT without .json + '-tune']."),
    cache: Path | None = typer.Option(None, "--cache", file_okay=False, help="Dense-result cache [default: WORK_DIR/dense-cache]."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads [default: torch's]."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Decide from WORK_DIR/records.jsonl alone, run nothing (a search stopped early)."
    ),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("float32", "--dtype"),
) -> None:
    """Search pruning layers, keep ratios and scorers on calibration prompts; write the chosen schedule file."""
    from rich.console import Console

    from . import tune
    from .eval.runner import split_list
    from .eval.tasks import SPLITS

    try:
        space = tune.SearchSpace(
            scorers=tuple(split_list(scorers)) if scorers else tune.DEFAULT_SCORERS,
            fractions=tuple(float(x) for x in fractions.split(",") if x.strip()),
            ratios=tuple(float(x) for x in ratios.split(",") if x.strip()), max_layers=max_layers,
        )
        cfg = tune.TuneConfig(
            model=model, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
            lengths=tuple(int(n) for n in lengths.split(",")), samples=samples,
            seed=SPLITS["calibration"] if seed is None else seed, eval_samples=eval_samples,
            target=tune.Target(max_loss=target_loss, min_speedup=target_speedup, rule=rule), space=space,
            work_dir=work_dir or out.with_name(out.stem + "-tune"), cache_dir=cache, device=device, dtype=dtype,
            threads=threads, run=not report_only,
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
    if result.chosen is None:
        console.print(f"[red]no candidate meets the target[/red] ({cfg.target}); the front above is what the "
                      "search space reaches: widen it (--ratios, --fractions, --scorers) or relax the target")
        raise typer.Exit(1)
    num_layers = len(result.chosen.candidate.computed)
    tune.save_schedule(result, cfg, num_layers, out)
    console.print(f"chose [bold]{result.chosen.candidate.name}[/bold] ({result.chosen.ideal:.2f}x ideal); wrote {out}")
