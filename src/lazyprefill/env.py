"""Environment helpers that every timing caller needs: dtype names, device synchronisation, machine info."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on `device`: CUDA, or any device under Triton's interpreter
    (TRITON_INTERPRET=1, as the tests run the kernels on the CPU)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    """Where a measurement ran: host, CPU or GPU, and library versions."""
    import transformers

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
