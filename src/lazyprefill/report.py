"""Show what LazyLLM kept: a self-contained HTML token map and PNG plots of depth per token and layer.

Users will not trust pruning they cannot see. Everything here is read from `GenerationOutput.stats`
(per-token scores and revival steps need `LazyLLM(..., trace=True)`); the engine is never touched.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .engine import StepTrace
from .generation import GenerationOutput, GenerationStats, LazyLLM
from .schedule import Schedule

# Categories of one (layer, token) cell in the K/V map: when, if ever, its K/V was computed.
NEVER, PREFILL, LATER, GENERATED = 0, 1, 2, 3
CELL_COLOURS = {NEVER: "#eceff3", PREFILL: "#2f6db5", LATER: "#f08c00", GENERATED: "#8e9aab"}
CELL_LABELS = {
    NEVER: "never computed",
    PREFILL: "computed in prefill",
    LATER: "computed later (revived)",
    GENERATED: "generated token",
}
_WINDOW = 6  # tokens of left context when decoding one token's text


# ------------------------------------------------------------------ data
def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text, so that `"".join(token_texts(tok, ids)) == decode(ids)`.

    Decoding tokens one at a time breaks characters split across tokens and, for sentencepiece, the
    spaces between words. So a token's text is what it adds to a short decoded window ending at it; a
    token that stops inside a character gets "" and the character goes to the token completing it.
    """
    ids = [int(i) for i in ids]
    texts: list[str] = []
    done = 0  # tokens before `done` have their text
    for i in range(len(ids)):
        start = max(0, done - _WINDOW)
        before = _decode(tokenizer, ids[start:done])
        after = _decode(tokenizer, ids[start : i + 1])
        if after.endswith("\ufffd") and i + 1 < len(ids):
            texts.append("")
            continue
        texts.append(after[len(before) :])
        done = i + 1
    return texts


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prefill_scores(stats: GenerationStats) -> dict[int, np.ndarray]:
    """Importance of each prompt token at each pruning layer of prefill: layer -> s [n_prompt], NaN
    where the token was no longer a candidate."""
    trace = _traces(stats)[0]
    n = len(stats.prefill_depth)
    out: dict[int, np.ndarray] = {}
    for layer, (pos, s) in sorted(trace.scores.items()):
        row = np.full(n, np.nan, dtype=np.float32)
        row[pos] = s
        out[layer] = row
    return out


def revival_steps(stats: GenerationStats) -> dict[int, list[int]]:
    """Position -> the decoding steps (1 = the step after prefill) that computed it again from the Aux Cache."""
    n = len(stats.prefill_depth)
    out: dict[int, list[int]] = {}
    for step, trace in enumerate(_traces(stats)[1:], start=1):
        q = n + step - 1  # the token this step feeds in
        rows = np.unique(np.concatenate(trace.computed)) if trace.computed else np.array([], dtype=np.int64)
        for pos in rows[rows != q].tolist():
            out.setdefault(pos, []).append(step)
    return out


def kv_map(stats: GenerationStats) -> np.ndarray:
    """[L, n_total] int8: for every (layer, token) whether its K/V was computed in prefill, later
    (revived), as a generated token's own step, or never. Token i has K/V at layer l iff l <= depth[i]."""
    n, L = len(stats.prefill_depth), stats.num_layers
    layers = np.arange(L)[:, None]  # [L, 1]
    final = stats.final_depth[None, :]  # [1, n_total]
    cells = np.full((L, final.shape[1]), NEVER, dtype=np.int8)
    cells[layers <= final] = LATER
    cells[:, :n][layers <= stats.prefill_depth[None, :]] = PREFILL
    cells[:, n:][layers <= final[:, n:]] = GENERATED
    return cells


def _traces(stats: GenerationStats) -> list[StepTrace]:
    if not stats.traces:
        raise ValueError("per-token scores and revivals need a traced run: use LazyLLM(model, ..., trace=True)")
    return stats.traces


# ----------------------------------------------------------------- plots
def plot_kept(out: GenerationOutput, path: str | Path) -> Path:
    """Write a PNG heat map of what was computed: layers x token position (prefill, revived, never),
    and, when there were decoding steps, the rows each step computed besides its new token."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    stats = out.stats
    cells = kv_map(stats)  # [L, n_total]
    n, L = len(stats.prefill_depth), stats.num_layers
    decode_steps = stats.steps[1:]
    panels = 2 if decode_steps else 1
    fig = Figure(figsize=(7.2, 5.1 if decode_steps else 3.2), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False, gridspec_kw={"height_ratios": [3, 2][:panels]})
    ax = axes[0, 0]
    cmap = ListedColormap([CELL_COLOURS[k] for k in sorted(CELL_COLOURS)])
    ax.imshow(cells, aspect="auto", origin="lower", cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="antialiased")
    if cells.shape[1] > n:
        ax.axvline(n - 0.5, color="#333333", lw=0.8, ls="--")
    ax.set(xlabel="token position", ylabel="layer", title="K/V computed per layer and token, whole generation")
    shown = sorted(set(np.unique(cells).tolist()))
    fig.legend(
        handles=[Patch(color=CELL_COLOURS[k], label=CELL_LABELS[k]) for k in shown],
        loc="outside upper center",
        ncol=len(shown),
        frameon=False,
        fontsize=8,
        handlelength=1,
        columnspacing=1,
    )
    if decode_steps:
        ax = axes[1, 0]
        extra = np.array([[c - 1 for c in s.computed] for s in decode_steps]).T  # [L, steps] rows besides q
        im = ax.imshow(
            extra,
            aspect="auto",
            origin="lower",
            cmap="Oranges",
            vmin=0,
            interpolation="nearest",
            extent=(0.5, len(decode_steps) + 0.5, -0.5, L - 0.5),
        )
        ax.set(xlabel="decoding step", ylabel="layer", title="Revived tokens computed per step and layer")
        fig.colorbar(im, ax=ax, pad=0.01, label="tokens")
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


def plot_layers(out: GenerationOutput, path: str | Path) -> Path:
    """Write a PNG bar chart of prompt tokens computed per layer: in prefill, later (revived), dense."""
    from matplotlib.figure import Figure

    stats = out.stats
    n, L = len(stats.prefill_depth), stats.num_layers
    prefill = np.array(stats.prefill_computed)
    later = np.array([sum(s.computed[l] - 1 for s in stats.steps[1:]) for l in range(L)])
    fig = Figure(figsize=(4.8, 5.1), layout="constrained")
    ax = fig.subplots()
    x = np.arange(L)
    ax.bar(x, prefill, color=CELL_COLOURS[PREFILL], label="prefill")
    if later.any():
        ax.bar(x, later, bottom=prefill, color=CELL_COLOURS[LATER], label="later decoding steps (revived)")
    ax.axhline(n, color="#333333", lw=1.2, ls="--", zorder=3, label=f"dense ({n} prompt tokens)")
    share = prefill.sum() / (n * L)
    ax.set(
        xlabel="layer",
        ylabel="tokens",
        xlim=(-0.6, L - 0.4),
        ylim=(0, n * 1.32),
        title=f"Prompt tokens computed per layer\n(prefill: {share:.0%} of dense)",
    )
    ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


# ------------------------------------------------------------------- run
def inspect_prompt(
    model,
    tokenizer,
    ids: torch.Tensor,
    schedule: str | dict | Schedule | None,
    max_new_tokens: int,
    repeats: int = 3,
) -> tuple[GenerationOutput, GenerationOutput]:
    """Return (lazy, dense) greedy outputs for one prompt; the lazy one is traced.

    Both `ttft_s` are medians of `repeats` untraced runs, interleaved, after a short warm-up, so that
    neither pays first-call costs or the host copies that tracing adds to prefill.
    """
    dense_llm = LazyLLM(model, None, tokenizer=tokenizer)
    lazy_llm = LazyLLM(model, schedule, tokenizer=tokenizer)
    lazy_llm.check_request(ids, max_new_tokens)  # before the warm-up: a request too long fails at once
    warm = ids[: min(len(ids), 64)]
    for llm in (dense_llm, lazy_llm):
        llm.generate(warm, max_new_tokens=2)
    dense = dense_llm.generate(ids, max_new_tokens=max_new_tokens)
    dense_ttft, lazy_ttft = [dense.ttft_s], []
    for i in range(repeats):
        lazy_ttft.append(lazy_llm.generate(ids, max_new_tokens=1).ttft_s)
        if i + 1 < repeats:
            dense_ttft.append(dense_llm.generate(ids, max_new_tokens=1).ttft_s)
    lazy = LazyLLM(model, schedule, tokenizer=tokenizer, trace=True).generate(ids, max_new_tokens=max_new_tokens)
    dense.ttft_s, lazy.ttft_s = statistics.median(dense_ttft), statistics.median(lazy_ttft)
    return lazy, dense


# ------------------------------------------------------------------ HTML
def write_report(
    path: str | Path,
    lazy: GenerationOutput,
    tokens: list[str],
    *,
    model: str,
    schedule: Schedule,
    schedule_name: str,
    dense: GenerationOutput | None = None,
) -> list[Path]:
    """Write `path` (HTML) and its two PNGs beside it; return the three paths.

    `lazy` must come from a traced run; `tokens` are the prompt's token texts (`token_texts`).
    """
    stats = lazy.stats
    n = len(stats.prefill_depth)
    if len(tokens) != n:
        raise ValueError(f"got {len(tokens)} token texts for a {n}-token prompt")
    path = Path(path)
    heat = plot_kept(lazy, path.with_name(path.stem + ".heatmap.png"))
    bars = plot_layers(lazy, path.with_name(path.stem + ".layers.png"))
    path.write_text(_render(lazy, tokens, model, schedule, schedule_name, dense, heat, bars), encoding="utf-8")
    return [path, heat, bars]


def _render(
    lazy: GenerationOutput,
    tokens: list[str],
    model: str,
    schedule: Schedule,
    schedule_name: str,
    dense: GenerationOutput | None,
    heat: Path,
    bars: Path,
) -> str:
    stats = lazy.stats
    n, L = len(stats.prefill_depth), stats.num_layers
    pre = stats.prefill_depth.tolist()
    fin = stats.final_depth[:n].tolist()
    revived = {p: s for p, s in revival_steps(stats).items() if p < n}
    scores = {
        str(l): [None if math.isnan(x) else float(f"{x:.3g}") for x in s.tolist()]
        for l, s in prefill_scores(stats).items()
    }
    data = {
        "L": L,
        "pre": pre,
        "fin": fin,
        "rev": {str(p): s for p, s in revived.items()},
        "scores": scores,
    }
    depths = sorted(set(pre) | set(fin))
    spans = "".join(f'<span class="d{d}">{html.escape(t, quote=False)}</span>' for d, t in zip(pre, tokens))
    work = stats.prefill_work
    cards = [("TTFT LazyLLM", _duration(lazy.ttft_s))]
    if dense is not None:
        cards += [("TTFT dense", _duration(dense.ttft_s)), ("speedup", f"{dense.ttft_s / lazy.ttft_s:.2f}×")]
    cards += [
        ("prefill work", f"{work:.0%} of dense"),
        ("prompt tokens", f"{n}"),
        ("revived later", f"{len(revived)} tokens"),
    ]
    card_html = "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div></div>' for k, v in cards)
    keep = ", ".join(f"layer {l}: keep {r:g}" for l, r in schedule.keep.items())
    answers = f'<div class="ans"><div class="k">answer (LazyLLM)</div><pre>{_esc(lazy.text)}</pre></div>'
    if dense is not None:
        same = dense.new_tokens == lazy.new_tokens
        verdict = "identical to LazyLLM" if same else "differs from LazyLLM"
        body = "" if same else f"<pre>{_esc(dense.text)}</pre>"
        answers += f'<div class="ans"><div class="k">answer (dense): <b>{verdict}</b></div>{body}</div>'
    legend = "".join(
        f'<span class="sw d{d}">{"all " + str(L) + " layers" if d == L - 1 else f"layers 0–{d}"}: '
        f'<b id="n{d}"></b></span>'
        for d in depths
    )
    return _PAGE.format(
        title=html.escape(f"lazyprefill inspect: {model}"),
        model=html.escape(model),
        schedule=html.escape(
            f"{schedule_name} ({schedule.scorer.spec()}: {keep})" if keep else f"{schedule_name} (no pruning)"
        ),
        layers=L,
        cards=card_html,
        per_layer=html.escape(_runs(stats.prefill_computed)),
        answers=answers,
        heat=_data_uri(heat),
        bars=_data_uri(bars),
        legend=legend,
        revived=len(revived),
        css=_depth_css(depths),
        spans=spans,
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
    )


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _esc(text: str | None) -> str:
    return html.escape(text or "", quote=False)


def _runs(counts: list[int]) -> str:
    """[5, 5, 3, 3, 3] -> 'layers 0–1: 5 · layers 2–4: 3'."""
    out, start = [], 0
    for l in range(1, len(counts) + 1):
        if l == len(counts) or counts[l] != counts[start]:
            span = f"layer {start}" if l - 1 == start else f"layers {start}–{l - 1}"
            out.append(f"{span}: {counts[start]}")
            start = l
    return " · ".join(out)


def _depth_css(depths: list[int]) -> str:
    """One background per depth that occurs: pale for tokens dropped early, deeper blue for tokens read
    deeper. Evenly spaced by rank, because only a few depths occur (the pruning layers and the last)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    blues = colormaps["Blues"]
    shade = {d: 0.6 - 0.54 * (len(depths) - 1 - k) / max(1, len(depths) - 1) for k, d in enumerate(depths)}
    return "".join(f".d{d}{{background:{to_hex(blues(shade[d]))}}}" for d in depths)


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/>
<title>{title}</title>
<style>
body{{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2933;
margin:0;background:#fafbfc}}
main{{max-width:1180px;margin:0 auto;padding:20px 28px 60px}}
h1{{font-size:22px;margin:0 0 2px}}
h2{{font-size:17px;margin:26px 0 8px}}
.meta{{color:#52606d;margin-bottom:14px}}
.meta b{{color:#1f2933}}
.cards{{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:12px}}
.card{{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:8px 14px;min-width:120px}}
.k{{font-size:12px;color:#52606d;text-transform:uppercase;letter-spacing:.04em}}
.v{{font-size:20px;font-weight:600}}
.ans{{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:8px 14px;margin-bottom:8px}}
.ans pre{{white-space:pre-wrap;margin:4px 0 0;font:14px/1.45 ui-monospace,Menlo,Consolas,monospace}}
.per{{color:#52606d;font-size:13px}}
.help{{color:#52606d;font-size:14px;margin:0 0 6px;max-width:900px}}
.figs{{display:grid;grid-template-columns:3fr 2fr;gap:10px;align-items:start}}
.figs img{{width:100%;background:#fff;border:1px solid #dde2e8;border-radius:8px}}
.bar{{position:sticky;top:0;background:#fafbfc;padding:8px 0;border-bottom:1px solid #dde2e8;z-index:1;
display:flex;flex-wrap:wrap;gap:8px;align-items:center}}
button{{font:inherit;font-size:14px;padding:4px 12px;border:1px solid #9aa5b1;border-radius:6px;background:#fff;
cursor:pointer}}
button.on{{background:#1f2933;color:#fff;border-color:#1f2933}}
.sw{{font-size:13px;padding:1px 8px;border-radius:4px;border:1px solid #d0d6dd}}
.sw.r{{box-shadow:inset 0 -3px 0 #f08c00;background:#fff}}
#doc{{white-space:pre-wrap;word-wrap:break-word;font:14px/1.75 ui-monospace,Menlo,Consolas,monospace;
background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:14px 18px;margin-top:10px}}
#doc span{{border-radius:2px}}
#doc span:hover{{outline:2px solid #1f2933}}
#doc .r{{box-shadow:inset 0 -3px 0 #f08c00}}
#tip{{position:fixed;display:none;pointer-events:none;background:#1f2933;color:#fff;font-size:13px;
line-height:1.45;padding:8px 10px;border-radius:6px;max-width:420px;z-index:2;white-space:pre}}
{css}
</style>
</head>
<body>
<main>
<h1>What LazyLLM kept</h1>
<div class="meta">model <b>{model}</b> · schedule <b>{schedule}</b> · {layers} layers</div>
<div class="cards">{cards}</div>
{answers}
<div class="per">Tokens computed per layer in prefill: {per_layer}</div>
<h2>Computed per layer and token</h2>
<div class="figs"><img alt="K/V computed per layer and token" src="{heat}"/>
<img alt="tokens computed per layer" src="{bars}"/></div>
<h2>The prompt, shaded by the deepest layer each token reached</h2>
<p class="help">Pale tokens were dropped early in prefill; the darkest ran through every layer. Hover a token for
its importance score and rank at each pruning layer. <i>After generation</i> shows the depths once every decoding
step has reselected and revived tokens (underlined).</p>
<div class="bar"><button id="v-pre" class="on">after prefill</button>
<button id="v-fin">after generation</button>
<span>deepest layer:</span>{legend}<span class="sw r">revived: {revived}</span></div>
<div id="doc">{spans}</div>
</main>
<div id="tip"></div>
<script type="application/json" id="lp-data">{data}</script>
<script>
(function(){{
var D=JSON.parse(document.getElementById("lp-data").textContent);
var doc=document.getElementById("doc"),tip=document.getElementById("tip"),spans=doc.children;
var layers=Object.keys(D.scores).map(Number).sort(function(a,b){{return a-b}});
var sorted={{}};
layers.forEach(function(l){{
  sorted[l]=D.scores[l].filter(function(x){{return x!==null}}).sort(function(a,b){{return b-a}})}});
function rank(l,s){{
  var a=sorted[l],lo=0,hi=a.length;while(lo<hi){{var m=(lo+hi)>>1;if(a[m]>s)lo=m+1;else hi=m}}return lo+1}}
function reach(d){{return d===D.L-1?"all "+D.L+" layers":"layers 0–"+d+" ("+(d+1)+" of "+D.L+")"}}
function show(v){{
  var d=D[v],count={{}};
  for(var i=0;i<spans.length;i++){{
    spans[i].className="d"+d[i]+(v==="fin"&&D.rev[i]?" r":"");count[d[i]]=(count[d[i]]||0)+1;
  }}
  document.querySelectorAll(".bar b").forEach(function(b){{b.textContent=count[b.id.slice(1)]||0}});
  document.getElementById("v-pre").className=v==="pre"?"on":"";
  document.getElementById("v-fin").className=v==="fin"?"on":"";
}}
document.getElementById("v-pre").onclick=function(){{show("pre")}};
document.getElementById("v-fin").onclick=function(){{show("fin")}};
for(var i=0;i<spans.length;i++)spans[i].i=i;
doc.addEventListener("mouseover",function(e){{
  var t=e.target;if(t.i===undefined)return;var i=t.i,lines=[];
  lines.push("token "+i+"  "+JSON.stringify(t.textContent));
  lines.push("after prefill: "+reach(D.pre[i]));
  lines.push("after generation: "+reach(D.fin[i])+(D.rev[i]?"  revived at step "+D.rev[i].join(", "):"  not revived"));
  layers.forEach(function(l){{
    var s=D.scores[l][i];
    if(s===null){{lines.push("layer "+l+": not a candidate");return}}
    lines.push("layer "+l+": score "+s.toExponential(2)+"  rank "+rank(l,s)+"/"+sorted[l].length+
      (D.pre[i]===l?"  dropped here":"  kept"));
  }});
  tip.textContent=lines.join("\\n");tip.style.display="block";
}});
doc.addEventListener("mousemove",function(e){{
  var x=e.clientX+14,y=e.clientY+16;
  if(x+tip.offsetWidth>innerWidth)x=innerWidth-tip.offsetWidth-4;
  if(y+tip.offsetHeight>innerHeight)y=e.clientY-tip.offsetHeight-10;
  tip.style.left=x+"px";tip.style.top=y+"px";
}});
doc.addEventListener("mouseleave",function(){{tip.style.display="none"}});
show(location.hash==="#final"?"fin":"pre");
}})();
</script>
</body>
</html>
"""
