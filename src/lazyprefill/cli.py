"""The `lazyprefill` command line. Each command lives in its own function; the engine knows nothing of it."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LazyLLM dynamic token pruning for Hugging Face LLMs.")
