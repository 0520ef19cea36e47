"""What the kernel launch-setting sweeps share (decode_attention.py, burst_attention.py): choosing a setting.

A sweep's cases each hold `sweep`: [setting, device ms or None (did not run), relative error] per setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def report(cases: list[dict], settings: list[tuple], default: tuple, fields: tuple[str, ...],
           setting_path: str | None, json_path: str | None) -> None:
    """Rank the settings that ran and were correct (rel <= 1e-2) on every case by their total time; print the
    best five and the default's total; write the best as {field: value} and every case as JSON."""
    correct = [s for s in settings
               if all(ms is not None and r <= 1e-2 for row in cases for ss, ms, r in row["sweep"] if tuple(ss) == s)]
    totals = {s: sum(ms for row in cases for ss, ms, _ in row["sweep"] if tuple(ss) == s) for s in correct}
    ranked = sorted(totals.items(), key=lambda x: x[1])
    print(f"settings ({', '.join(fields)}) by total ms over all cases:", ranked[:5])
    print(f"default {default}: {totals.get(default)}")
    if setting_path and ranked:
        Path(setting_path).write_text(json.dumps(dict(zip(fields, ranked[0][0], strict=True))))
    if json_path:
        Path(json_path).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "cases": cases}, indent=1))
