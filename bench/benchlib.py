"""Shared pieces of the benchmarks: machine facts, peak memory, JSON + Markdown output."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fedsilo.common.records import TextRecords

RESULTS = Path(__file__).resolve().parent / "results"
#: The demo's script (not a package); benchmarks run it and read its defaults.
SIMULATION = Path(__file__).resolve().parents[1] / "simulations" / "run_simulation.py"


def simulation() -> ModuleType:
    """Import ``simulations/run_simulation.py`` for its parser and demo defaults."""
    spec = importlib.util.spec_from_file_location("run_simulation", SIMULATION)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict[str, Any]:
    """Facts that make a benchmark's numbers comparable."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def reset_peak(device: torch.device | None = None) -> int:
    """Reset the peak-memory counter; return the current resident (or CUDA) bytes.

    ``device`` None: CUDA's counters when CUDA is present, else the process's.
    """
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    return _status_bytes("VmRSS")


def peak(device: torch.device | None = None) -> int:
    """Peak resident (or CUDA allocated) bytes since :func:`reset_peak`."""
    if _cuda(device):
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def _cuda(device: torch.device | None) -> bool:
    return torch.cuda.is_available() if device is None else device.type == "cuda"


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def write(name: str, doc: dict[str, Any], table: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``; return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **doc}, indent=2) + "\n", "utf-8")
    (RESULTS / f"{name}.md").write_text(table + "\n", "utf-8")
    return path


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, *parts: TextRecords) -> int:
    """Write the records of ``parts`` to ``path`` as a text,label CSV; return the row count."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for part in parts:
            writer.writerows(zip(part.texts, part.labels, strict=True))
    return sum(len(part) for part in parts)
