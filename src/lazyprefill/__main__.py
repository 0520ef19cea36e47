"""`python -m lazyprefill ...`: the CLI where the `lazyprefill` script is not installed (a source checkout)."""

from .cli import app

app(prog_name="lazyprefill")
