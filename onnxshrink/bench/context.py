"""What surrounds a measurement: the machine, its load, and whether the ratios held steady."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import numpy as np
import onnx

from onnxshrink import __version__
from onnxshrink.runtime import available_providers


def environment() -> dict[str, Any]:
    """Versions and the machine, for the report's ``environment`` section."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "onnxshrink": __version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "available_providers": available_providers(),
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or ``None`` where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not on Windows
        return None


#: Block ratios further apart than this (relative to the ratio) earn a note.
DRIFT_WARN = 0.10


def stability_notes(entries: list[dict[str, Any]], load: list[float] | None) -> list[str]:
    """Notes for a busy machine (load above the CPU count) and for ratios that drifted mid-run."""
    notes = []
    cpus = os.cpu_count() or 1
    if load is not None and load[0] > cpus:
        notes.append(
            f"the machine was busy (1-minute load average {load[0]:g} on {cpus} logical CPUs): other work can "
            "slow different models by different factors, so latency ratios may not repeat; gate on a quiet machine"
        )
    for m in entries[1:]:
        vs = m["vs_baseline"]
        blocks = vs["latency_ratio_blocks"]
        spread = (max(blocks) - min(blocks)) / vs["latency_ratio"]
        if spread > DRIFT_WARN:
            values = ", ".join(f"{b:.3f}" for b in blocks)
            notes.append(
                f"{m['name']}: the latency ratio drifted during the run (by quarter: {values}); the machine's load "
                "changed, and the 95% interval, which assumes it did not, is too narrow"
            )
    return notes
