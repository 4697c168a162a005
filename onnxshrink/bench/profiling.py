"""Where the time goes, per op type, and which nodes ran on which execution provider.

A separate short pass, so that the profiler's overhead never touches the latency figures: a
fresh session with ``SessionOptions.enable_profiling`` runs the model ``runs + 1`` times and
onnxruntime writes a Chrome-trace JSON file (into a temporary folder, removed afterwards).

From the trace:

* node events (``cat == "Node"``, names ending ``_kernel_time``) carry ``dur`` (microseconds),
  ``args.op_name`` (the op type *after* onnxruntime's graph optimisations, so fused kernels
  such as ``FusedConv`` or ``QLinearConv`` appear under their own names) and
  ``args.provider``;
* ``model_run`` events delimit runs; node events inside the first run are dropped (first-run
  allocations and lazy initialisation); each op type's time is summed per run and the median
  over runs is reported (robust to a run disturbed by another process).

``cpu_fallback_nodes``: when the requested provider is not the CPU one, every node the trace
shows on ``CPUExecutionProvider``. onnxruntime places some shape-computation nodes on the CPU
on purpose; the op types say which is which. ``Memcpy*`` nodes are the copies between device
and host that such a split costs.
"""

from __future__ import annotations

import bisect
import json
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.runtime import resolve_provider

CPU = "CPUExecutionProvider"


@dataclass
class OpTime:
    op_type: str
    us_per_run: float
    nodes: int


@dataclass
class Profile:
    runs: int
    by_op_type: list[OpTime]  # slowest first
    providers: dict[str, int]  # provider -> number of nodes it ran
    cpu_fallback_nodes: list[dict[str, str]] = field(default_factory=list)

    @property
    def total_us_per_run(self) -> float:
        return sum(t.us_per_run for t in self.by_op_type)

    def to_json(self) -> dict[str, Any]:
        total = self.total_us_per_run
        return {
            "runs": self.runs,
            "total_us_per_run": total,
            "by_op_type": [
                {
                    "op_type": t.op_type,
                    "us_per_run": t.us_per_run,
                    "share": t.us_per_run / total if total > 0 else 0.0,
                    "nodes": t.nodes,
                }
                for t in self.by_op_type
            ],
            "providers": self.providers,
            "cpu_fallback_nodes": self.cpu_fallback_nodes,
        }


def require_provider(session: Any, provider: str) -> None:
    """Fail when onnxruntime dropped ``provider`` while creating ``session``.

    onnxruntime logs and carries on with the CPU provider when a GPU provider's libraries
    (CUDA, cuDNN, TensorRT) cannot be loaded; a benchmark must not report CPU figures as GPU
    ones.
    """
    active = list(session.get_providers())
    if provider not in active:
        raise ConfigError(
            f"execution provider '{provider}' is installed but failed to start (onnxruntime fell back to "
            f"{', '.join(active)}); check that its libraries (CUDA, cuDNN, TensorRT) are installed and on "
            "the library path"
        )


def parse_trace(
    events: list[dict[str, Any]], *, requested_provider: str, skip_first_run: bool = True
) -> Profile:
    """Aggregate an onnxruntime profiling trace (the list of Chrome-trace events).

    Node events are assigned to runs by the ``model_run`` windows they start in; each op
    type's time is summed per run and the median over the counted runs is reported, so one
    run disturbed by another process does not skew the breakdown.
    """
    runs = sorted(
        (int(e["ts"]), int(e["ts"]) + int(e.get("dur", 0))) for e in events if e.get("name") == "model_run"
    )
    first = 1 if skip_first_run and len(runs) > 1 else 0
    counted = runs[first:]
    starts = [lo for lo, _ in counted]
    per_run: dict[str, np.ndarray] = {}
    node_sets: dict[str, set[str]] = defaultdict(set)
    providers: dict[str, set[str]] = defaultdict(set)
    fallback: dict[str, str] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = str(args.get("op_name", "?"))
        node = name[: -len("_kernel_time")]
        provider = str(args.get("provider", "?"))
        providers[provider].add(node)
        node_sets[op].add(node)
        if provider == CPU and requested_provider != CPU:
            fallback[node] = op
        ts = int(e.get("ts", 0))
        k = bisect.bisect_right(starts, ts) - 1
        if k < 0 or ts > counted[k][1]:
            continue  # the discarded first run, or outside any run
        per_run.setdefault(op, np.zeros(len(counted)))[k] += float(e.get("dur", 0))
    ops = [
        OpTime(op, float(np.median(per_run[op])) if op in per_run else 0.0, len(node_sets[op]))
        for op in node_sets
    ]
    ops.sort(key=lambda t: (-t.us_per_run, t.op_type))
    return Profile(
        runs=len(counted),
        by_op_type=ops,
        providers={p: len(n) for p, n in sorted(providers.items())},
        cpu_fallback_nodes=[{"name": n, "op_type": op} for n, op in sorted(fallback.items())],
    )


def profile_model(
    source: bytes | str,
    feed: dict[str, np.ndarray],
    *,
    provider: str,
    threads: int | None,
    provider_options: dict[str, str],
    runs: int = 10,
) -> Profile:
    """Profile ``runs`` runs (plus one discarded first run) of a fresh session."""
    full = resolve_provider(provider)  # also quiets onnxruntime's logger
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp(prefix="onnxshrink-profile-"))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        # make_session has no knob for the trace's location; without one onnxruntime writes
        # it into the current directory, hence this session of our own.
        options.profile_file_prefix = str(tmp / "trace")
        providers: list[Any] = [(full, provider_options)]
        if full != CPU:
            providers.append(CPU)
        try:
            session = ort.InferenceSession(source, options, providers=providers)
            require_provider(session, full)
            for _ in range(runs + 1):
                session.run(None, feed)
        except ShrinkError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShrinkError(f"onnxruntime failed in the profiler pass: {first}") from exc
        trace = Path(session.end_profiling())
        if not trace.is_absolute():
            trace = Path.cwd() / trace
        with open(trace, encoding="utf-8") as f:
            events = json.load(f)
        return parse_trace(events, requested_provider=full)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
