"""Peak memory of a model's session, measured in a fresh child process per model.

What is measured:

* ``peak_rss_growth_bytes``: the growth of the child's peak resident set size (Linux
  ``VmHWM``) while it creates the model's onnxruntime session and runs it ``runs`` times, over
  its resident size just before. The child has already imported onnxruntime, loaded and vetted
  the model (:func:`onnxshrink.modelio.load_model`), read the input feed, and created, run and
  dropped a one-node session, so none of that is counted: what is counted is what this model's
  session costs (its copy of the weights, pre-packed kernels, the memory arena, activations).
* ``runtime_init_bytes``: the peak growth caused by that first one-node session: onnxruntime's
  one-time costs in a fresh process (library code paged in, the environment, thread pools),
  paid once per process whatever the model (about 30 MiB with onnxruntime 1.32 on CPU here).
* ``process_peak_rss_bytes``: the child's peak RSS at the end, Python and numpy included: an
  upper bound for a Python process that serves this one model.

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


class _Peak:
    """Peak-RSS bookkeeping with the best method this system allows."""

    def __init__(self) -> None:
        if _status_kib("VmRSS") is None:
            self.method = "rusage-delta"
        else:
            self.method = "vmhwm-reset" if _reset_peak() else "vmhwm-delta"

    def start(self) -> int:
        """Mark the start of a measured stretch; returns the reference level in bytes."""
        if self.method == "rusage-delta":
            return _rusage_peak_bytes()
        if self.method == "vmhwm-reset":
            _reset_peak()
            return (_status_kib("VmRSS") or 0) * 1024
        return (_status_kib("VmHWM") or 0) * 1024

    def peak(self) -> int:
        if self.method == "rusage-delta":
            return _rusage_peak_bytes()
        return (_status_kib("VmHWM") or 0) * 1024


def _tiny_model() -> Any:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "warmup",
        [value("x", TensorProto.FLOAT, [1])],
        [value("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _child(request: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from onnxshrink.modelio import load_model, ort_model_source
    from onnxshrink.runtime import make_session, resolve_provider

    options = {
        "provider": request["provider"],
        "threads": request["threads"],
        "provider_options": request["provider_options"],
    }
    model, _ = load_model(request["model"])
    with np.load(request["feeds"], allow_pickle=False) as npz:
        feed = {k: npz[k] for k in npz.files}
    peak = _Peak()
    with ort_model_source(model) as source:
        del model
        # onnxruntime's one-time costs in a fresh process (library pages, environment): paid
        # once per process whatever the model, so measured apart, with a one-node session.
        before = peak.start()
        warm = make_session(_tiny_model(), **options)
        warm.run(None, {"x": np.zeros(1, np.float32)})
        del warm
        runtime_init = max(0, peak.peak() - before)
        before = peak.start()
        session = make_session(source, **options)
        if resolve_provider(request["provider"]) not in session.get_providers():
            raise SystemExit(f"execution provider {request['provider']} failed to start")
        for _ in range(max(1, request["runs"])):
            session.run(None, feed)
        growth = max(0, peak.peak() - before)
    return {
        "method": peak.method,
        "peak_rss_growth_bytes": growth,
        "runtime_init_bytes": runtime_init,
        "process_peak_rss_bytes": peak.peak() if peak.method != "rusage-delta" else _rusage_peak_bytes(),
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
        return _failed(runs, str(exc))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        log.warning("memory measurement failed for %s: %s", model_path, tail)
        return _failed(runs, tail[:300])
    result = json.loads(lines[-1])
    result["error"] = None
    return result


def _failed(runs: int, error: str) -> dict[str, Any]:
    return {
        "method": None,
        "peak_rss_growth_bytes": None,
        "runtime_init_bytes": None,
        "process_peak_rss_bytes": None,
        "runs": runs,
        "error": error,
    }


def main() -> int:
    request = json.loads(sys.stdin.read())
    print(json.dumps(_child(request)))
    return 0


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    sys.exit(main())
