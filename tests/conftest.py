"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch
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
