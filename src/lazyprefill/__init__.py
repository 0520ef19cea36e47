"""lazyprefill: LazyLLM dynamic token pruning for faster long-prompt answers from Hugging Face LLMs."""

from .engine import DecodeOptions
from .generation import GenerationOutput, GenerationStats, LazyLLM, Session
from .report import plot_kept
from .schedule import PRESETS, Schedule, parse_schedule

__all__ = ["LazyLLM", "Session", "GenerationOutput", "GenerationStats", "Schedule", "PRESETS", "parse_schedule",
           "plot_kept", "DecodeOptions"]
__version__ = "0.1.0"
