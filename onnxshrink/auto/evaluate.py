"""One unit of ``auto``'s work, runnable in this process, a spawned process or a Ray task.

A :class:`Job` builds a model from a recipe (the same pipeline as ``onnxshrink run``, so the
bytes match what the recipe reproduces) and scores it against the original's outputs on the
evaluation samples. It never times anything: latency is measured by the caller, one model at
a time, so parallel jobs cannot disturb it. Everything a job needs travels with it (plain
data: paths must be readable where it runs).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalSpec:
    """Which samples judge a candidate, and the original's outputs on them."""

    source: str
    start: int
    stop: int
    reference: list[list[np.ndarray]]
    labels: list[Any]
    shapes: dict[str, list[int]]
    seed: int


@dataclass(frozen=True)
class Job:
    key: str
    recipe: dict[str, Any]  # Recipe.to_dict() with absolute paths
    model_path: str
    evaluation: EvalSpec
    keep_bytes: bool = True


def run_job(job: Job) -> dict[str, Any]:
    """Build ``job``'s model and score it; returns plain data (and the model's bytes).

    A candidate that cannot be built (a step that fails on this model) is reported as
    ``{"key", "failed": message}`` rather than stopping the search.
    """
    started = time.perf_counter()
    try:
        return _run_job(job)
    except Exception as exc:  # noqa: BLE001 - one failed candidate must not end the search
        from onnxshrink.errors import ShrinkError

        text = exc.one_line() if isinstance(exc, ShrinkError) else f"{type(exc).__name__}: {exc}"
        return {"key": job.key, "failed": " ".join(text.split())[:300], "seconds": round(time.perf_counter() - started, 3), "pid": os.getpid()}


def _run_job(job: Job) -> dict[str, Any]:
    from onnxshrink.data import DataOptions, open_dataset
    from onnxshrink.modelio import load_model
    from onnxshrink.recipe import Recipe
    from onnxshrink.runtime import make_session
    from onnxshrink.shrink import run_recipe
    from onnxshrink.verify import FidelityMeter

    started = time.perf_counter()
    recipe = Recipe.from_dict(job.recipe)
    with tempfile.TemporaryDirectory(prefix="onnxshrink-auto-") as tmp:
        out = Path(tmp) / "candidate.onnx"
        outcome = run_recipe(recipe, job.model_path, out, measure=False)
        data = out.read_bytes()
    build_seconds = time.perf_counter() - started
    ev = job.evaluation
    model, _ = load_model(job.model_path, load_weights=False, check=False)
    dataset = open_dataset(ev.source, model, DataOptions(seed=ev.seed, shapes=ev.shapes))
    session = make_session(data, threads=1)
    meter = FidelityMeter()
    samples = itertools.islice(iter(dataset), ev.start, ev.stop)
    for sample, ref, label in zip(samples, ev.reference, ev.labels):
        meter.update(ref, session.run(None, sample.feeds), label)
    fidelity = meter.result()
    result: dict[str, Any] = {
        "key": job.key,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "macs": outcome.macs_after,
        "params": outcome.params_after,
        "steps": outcome.steps,
        "fidelity": fidelity.to_json(),
        "int8_fp32_nodes": len(outcome.int8.fp32_nodes) if outcome.int8 else None,
        "build_seconds": round(build_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "pid": os.getpid(),
    }
    if job.keep_bytes:
        result["model_bytes"] = data
    return result
