"""Fixtures shared by the tests; the helpers they use live in helpers.py.

Without CUDA the Triton kernels run in Triton's interpreter. It is chosen when a kernel (Triton's own
reductions among them) is decorated, so the variable is set before `helpers` imports transformers' model
classes, through which torch imports triton.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Rich wraps CLI error panels at the console's width (80 without a terminal), splitting words of long messages,
# such as paths under pytest-xdist's per-worker folders: the tests read panels unwrapped.
os.environ["COLUMNS"] = "400"

from helpers import FAMILIES, tiny_model

# Tiny models on a shared 2-core machine: one thread avoids oversubscription (about 50x faster here).
torch.set_num_threads(1)


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request) -> torch.nn.Module:
    return tiny_model(request.param)


@pytest.fixture
def llama_gqa() -> torch.nn.Module:
    return tiny_model("llama_gqa_rope3")


@pytest.fixture
def qwen3() -> torch.nn.Module:
    return tiny_model("qwen3")
