"""Peak memory of a model's session, measured in a fresh child process per model.

What is measured (``peak_rss_growth_bytes``): the growth of the child's peak resident set
size (Linux ``VmHWM``) while it creates the onnxruntime session and runs it ``runs`` times,
over its resident size just before. The child first imports onnxruntime, loads and vets the
model (:func:`onnxshrink.modelio.load_model`) and reads the input feed, so none of that is
counted; what is counted is what the session itself costs: its copy of the weights,
pre-packed kernels, the memory arena and activations.

How: before creating the session the child resets ``VmHWM`` to the current RSS by writing
``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so the figure is exact. Where that is not
allowed the method is ``vmhwm-delta``: ``VmHWM`` after minus ``VmHWM`` before, a lower bound
(exact whenever the session's peak exceeds the import peak, the usual case). Without
``/proc`` (macOS, Windows) it falls back to ``resource.getrusage`` peak deltas, also a lower
bound. A child per model means each model starts from the same state, and the benchmark's own
process (which holds every model at once) does not blur the figures. GPU memory is not
counted.

Run as ``python -m onnxshrink.bench.memory`` with a JSON request on stdin (internal).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

#: Seconds a child may take (TensorRT engine builds are slow).
CHILD_TIMEOUT_S = 1800


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rusage_peak_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _child(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from onnxshrink.modelio import load_model, ort_model_source
    from onnxshrink.runtime import make_session, resolve_provider

    model, _ = load_model(request["model"])
    with np.load(request["feeds"], allow_pickle=False) as npz:
        feed = {k: npz[k] for k in npz.files}
    with ort_model_source(model) as source:
        del model
        if _status_kib("VmRSS") is not None:
            method = "vmhwm-reset" if _reset_peak() else "vmhwm-delta"
            before = (_status_kib("VmRSS") if method == "vmhwm-reset" else _status_kib("VmHWM")) or 0
            before *= 1024
        else:
            method = "rusage-delta"
            before = _rusage_peak_bytes()
        session = make_session(
            source,
            provider=request["provider"],
            threads=request["threads"],
            provider_options=request["provider_options"],
        )
        if resolve_provider(request["provider"]) not in session.get_providers():
            raise SystemExit(f"execution provider {request['provider']} failed to start")
        for _ in range(max(1, request["runs"])):
            session.run(None, feed)
        after = (_status_kib("VmHWM") or 0) * 1024 if method != "rusage-delta" else _rusage_peak_bytes()
    return {
        "method": method,
        "peak_rss_growth_bytes": max(0, after - before),
        "runs": max(1, request["runs"]),
    }


def measure_memory(
    model_path: str,
    feeds_npz: str,
    *,
    provider: str,
    threads: int | None,
    provider_options: dict[str, str],
    runs: int,
) -> dict[str, Any]:
    """Peak RSS growth of one model's session, from a fresh child process.

    Returns ``{"method", "peak_rss_growth_bytes", "runs", "error"}``; a failure of the child is
    reported in ``error`` (and the figure is ``None``) rather than raised: memory is one
    figure among many and the rest of the report stays useful.
    """
    request = {
        "model": model_path,
        "feeds": feeds_npz,
        "provider": provider,
        "threads": threads,
        "provider_options": provider_options,
        "runs": runs,
    }
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "onnxshrink.bench.memory"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"method": None, "peak_rss_growth_bytes": None, "runs": runs, "error": str(exc)}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        log.warning("memory measurement failed for %s: %s", model_path, tail)
        return {"method": None, "peak_rss_growth_bytes": None, "runs": runs, "error": tail[:300]}
    result = json.loads(lines[-1])
    result["error"] = None
    return result


def main() -> int:
    request = json.loads(sys.stdin.read())
    print(json.dumps(_child(request)))
    return 0


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    sys.exit(main())
