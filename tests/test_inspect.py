"""`lazyprefill inspect`: the HTML token map and the plots show exactly what the engine did.

A tiny random Llama and a byte-level BPE trained here on a few real-looking sentences (so no hub and
no download): pruning at layers 1 and 3 keeps half the candidates each time, which makes later
decoding steps revive tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from helpers import VOCAB, tiny_model
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import lazyprefill as lp
from lazyprefill import report
from lazyprefill.cli import app

CHROMIUM = Path("/usr/bin/chromium")
SCHEDULE = "1:0.5,3:0.5"
NEW_TOKENS = 8
TEXT = (
    "The café on Rue de Rivoli opens at 07:30 — croissants, naïve latte art & <b>bold</b> prices.\n"
    '東京 and Zürich both appear in the guide 😀; the guide says: "arrive early, order quickly".\n\n'
    "Python was created in the early 1990s by Guido van Rossum at Stichting Mathematisch Centrum in the "
    "Netherlands as a successor of a language called ABC. Guido remains Python's principal author, "
    "although it includes many contributions from others.\n"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 4, vocab_size=VOCAB, min_frequency=2, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    assert len(tok) <= VOCAB
    return tok


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    ids = tokenizer(TEXT)["input_ids"]
    assert 100 < len(ids) < 240  # fits the tiny model's 256 positions with the new tokens
    return ids


@pytest.fixture(scope="module")
def inspected(tokenizer, prompt, tmp_path_factory):
    model = tiny_model("llama_gqa_rope3")
    schedule = lp.parse_schedule(SCHEDULE, 6)
    lazy, dense = report.inspect_prompt(model, tokenizer, torch.tensor(prompt), schedule, NEW_TOKENS, repeats=1)
    texts = report.token_texts(tokenizer, prompt)
    path = tmp_path_factory.mktemp("report") / "report.html"
    written = report.write_report(
        path, lazy, texts, model="tiny-llama", schedule=schedule, schedule_name=SCHEDULE, dense=dense
    )
    return lazy, dense, texts, written


class _Page(HTMLParser):
    """Checks nesting (every element closed, in order) and collects the token spans of #doc."""

    VOID = frozenset({"meta", "img", "br", "hr", "input", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.spans: list[list] = []  # [class, text] of each span directly inside div#doc
        self.scripts: dict[str, str] = {}
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in self.VOID:
            return
        if tag == "span" and self.stack and self.stack[-1][1].get("id") == "doc":
            self.spans.append([attrs.get("class"), ""])
        self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        assert tag in self.VOID, f"<{tag}/> is not a void element"

    def handle_endtag(self, tag):
        assert tag not in self.VOID, f"</{tag}> closes a void element"
        assert self.stack and self.stack[-1][0] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        if not self.stack:
            assert not data.strip(), f"text outside <html>: {data[:40]!r}"
            return
        tag, attrs = self.stack[-1]
        if tag == "span" and len(self.stack) > 1 and self.stack[-2][1].get("id") == "doc":
            self.spans[-1][1] += data
        if tag == "script" and "id" in attrs:
            self.scripts[attrs["id"]] = self.scripts.get(attrs["id"], "") + data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], f"unclosed elements: {[t for t, _ in page.stack]}"
    return page


def test_token_texts_reassemble_the_decoded_text(tokenizer, prompt):
    texts = report.token_texts(tokenizer, prompt)
    assert len(texts) == len(prompt)
    assert "".join(texts) == tokenizer.decode(prompt)
    assert "\ufffd" not in "".join(texts)
    split = [i for i in range(len(prompt)) if tokenizer.decode(prompt[i : i + 1]).endswith("\ufffd")]
    assert split, "the text should make the tokenizer split some character across tokens"
    assert any(texts[i] == "" for i in split)  # a split character goes to the token that completes it


def test_html_is_well_formed_and_self_contained(inspected):
    page = _parse(inspected[3][0])
    assert page.tags[0][0] == "html"
    assert not [t for t, a in page.tags if t == "link" or (t == "script" and "src" in a)]
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 2 and all(src.startswith("data:image/png;base64,") for src in images)


def test_html_has_every_prompt_token_once_in_order_with_its_depth(inspected, tokenizer, prompt):
    lazy, _, texts, written = inspected
    page = _parse(written[0])
    assert [text for _, text in page.spans] == texts
    assert "".join(text for _, text in page.spans) == tokenizer.decode(prompt)
    assert [cls for cls, _ in page.spans] == [f"d{d}" for d in lazy.stats.prefill_depth]

    data = json.loads(page.scripts["lp-data"])
    n = len(prompt)
    assert data["pre"] == lazy.stats.prefill_depth.tolist()
    assert data["fin"] == lazy.stats.final_depth[:n].tolist()
    revived = {int(p) for p in data["rev"]}
    assert revived, "this schedule should revive prompt tokens"
    assert revived == set(np.flatnonzero(lazy.stats.final_depth[:n] > lazy.stats.prefill_depth).tolist())
    prefill = lazy.stats.traces[0]
    assert sorted(map(int, data["scores"])) == sorted(prefill.scores)
    for layer, (pos, s) in prefill.scores.items():
        shown = data["scores"][str(layer)]
        assert [i for i, x in enumerate(shown) if x is not None] == pos.tolist()
        np.testing.assert_allclose([shown[i] for i in pos], s, rtol=5e-3)


def test_kv_map_agrees_with_the_per_step_counts(inspected):
    stats = inspected[0].stats
    cells = report.kv_map(stats)  # [L, n_total]
    n = len(stats.prefill_depth)
    assert cells.shape == (stats.num_layers, len(stats.final_depth))
    assert ((cells[:, :n] == report.PREFILL).sum(axis=1) == np.array(stats.prefill_computed)).all()
    revived_rows = np.sum([np.array(s.computed) - 1 for s in stats.steps[1:]], axis=0)  # besides q, per layer
    assert ((cells == report.LATER).sum(axis=1) == revived_rows).all()
    assert (cells[:, n:] == report.GENERATED).all()  # q runs every layer in its own step
    assert (cells[0, :n] == report.PREFILL).all()


def test_plot_kept_writes_a_heat_map(inspected, tmp_path):
    path = lp.plot_kept(inspected[0], tmp_path / "kept.png")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 50


def test_report_needs_a_traced_run(tokenizer, prompt, tmp_path):
    out = lp.LazyLLM(tiny_model("llama_gqa_rope3"), SCHEDULE).generate(torch.tensor(prompt), max_new_tokens=2)
    texts = report.token_texts(tokenizer, prompt)
    with pytest.raises(ValueError, match="trace=True"):
        report.write_report(tmp_path / "r.html", out, texts, model="m", schedule=lp.Schedule(), schedule_name="x")


def test_cli_inspect_writes_the_report_and_plots(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("llama_gqa_rope3").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT[:300], encoding="utf-8")
    out = tmp_path / "out" / "inspect.html"
    result = CliRunner().invoke(
        app,
        [
            "inspect",
            "--model",
            str(model_dir),
            "--prompt-file",
            str(doc),
            "--schedule",
            SCHEDULE,
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.with_name("inspect.heatmap.png").stat().st_size > 0
    assert out.with_name("inspect.layers.png").stat().st_size > 0
    page = _parse(out)
    assert "".join(text for _, text in page.spans) == tokenizer.decode(tokenizer(TEXT[:300])["input_ids"])


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="rendering the report needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
)
def test_report_renders_in_headless_chromium(inspected, tmp_path):
    html_path = inspected[3][0]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            html_path.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = mpimg.imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (1600, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, "the screenshot is blank"
    deepest = inspected[0].stats.num_layers - 1  # the shade of tokens that ran every layer must show
    colour = re.search(rf"\.d{deepest}\{{background:#([0-9a-f]{{6}})\}}", html_path.read_text(encoding="utf-8"))
    rgb = np.array([int(colour.group(1)[i : i + 2], 16) for i in (0, 2, 4)]) / 255
    assert (np.abs(pixels - rgb).max(axis=-1) < 2 / 255).sum() > 500
