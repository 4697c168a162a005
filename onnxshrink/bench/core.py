"""Run a benchmark: latency, size, memory, accuracy/fidelity, profile and gates of N models.

The first model is the baseline, the others are candidates compared with it. Order of work,
chosen so that no step disturbs the latency figures:

1. load and vet every model (:func:`onnxshrink.modelio.load_model`); resolve the provider
   (a missing one is a :class:`~onnxshrink.errors.ConfigError`, exit code 2);
2. create one session per model, timed (``session_create_ms``);
3. latency: all sessions interleaved (:func:`~onnxshrink.bench.timing.measure_interleaved`);
4. accuracy and fidelity over the whole data set (or over seeded random inputs);
5. the profiler pass (:mod:`onnxshrink.bench.profiling`), in fresh sessions;
6. memory, each model in a child process of its own (:mod:`onnxshrink.bench.memory`);
7. the fusion lint (:mod:`onnxshrink.fusion`, when installed) and the gates.

The result is the JSON payload documented in :mod:`onnxshrink.bench.schema`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from onnxshrink.bench import gates as gates_mod
from onnxshrink.bench.context import environment as machine
from onnxshrink.bench.context import load_average, stability_notes
from onnxshrink.bench.evaluate import evaluate, take_batches
from onnxshrink.bench.memory import measure_memory
from onnxshrink.bench.profiling import profile_model, require_provider
from onnxshrink.bench.schema import SCHEMA
from onnxshrink.bench.timing import (
    LatencyStats,
    block_ratios,
    measure_interleaved,
    paired_ratio,
    ratio_interval,
)
from onnxshrink.data import DataOptions, Dataset, RandomDataset, model_input_specs, open_dataset
from onnxshrink.errors import ConfigError, DataError, ShrinkError
from onnxshrink.modelio import ModelInfo, load_model, ort_model_source
from onnxshrink.runtime import check_onnxruntime_survives, make_session, resolve_provider, run
from onnxshrink.stats import concrete_input_shapes, count_macs, graph_inputs, value_signature
from onnxshrink.verify import FidelityMeter

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How to benchmark (a field set by a command-line flag names it in brackets)."""

    provider: str = "cpu"  # [--provider] short name or full onnxruntime provider name
    provider_options: dict[str, str] = field(default_factory=dict)  # [--provider-option]
    threads: int | None = 1  # [--threads] intra-op threads; 0 or None: onnxruntime decides
    batch: int = 1  # [--batch]
    shapes: dict[str, list[int]] = field(default_factory=dict)  # [--shape] full input shapes
    runs: int = 100  # [--runs] timed rounds, at least
    min_time: float = 1.0  # [--min-time] seconds of timed rounds, at least (more rounds if needed)
    warmup: int = 10  # [--warmup] untimed rounds
    data: str | None = None  # [--data] npz / folder; None: seeded random inputs
    seed: int = 0  # [--seed] random inputs and the bootstrap
    gates: gates_mod.GateSpec = field(default_factory=gates_mod.GateSpec)
    memory: bool = True  # [--no-memory] skip the child-process memory measurement
    profile: bool = True  # [--no-profile] skip the profiler pass
    profile_runs: int = 20
    memory_runs: int = 10
    random_samples: int = 32  # random batches for fidelity when there is no --data
    latency_feeds: int = 8  # distinct batches cycled through while timing
    progress: bool = True  # tqdm bar on stderr (also off when stderr is not a terminal)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, not {self.batch}")
        if self.runs < 3:
            raise ConfigError(f"--runs must be at least 3, not {self.runs}")
        if self.min_time < 0:
            raise ConfigError(f"--min-time must not be negative, not {self.min_time}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must not be negative, not {self.warmup}")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"--threads must not be negative, not {self.threads}")


@dataclass
class _Model:
    name: str
    path: str
    proto: onnx.ModelProto
    info: ModelInfo
    source: bytes | str = b""
    session: Any = None
    create_ms: float = 0.0


def _unique_names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        base = Path(p).stem or Path(p).name
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


def _input_shapes(model: onnx.ModelProto, config: BenchConfig) -> dict[str, list[int]]:
    """Concrete input shapes for random inputs: --shape first, else a symbolic batch = --batch."""
    shapes, unresolved = concrete_input_shapes(model, config.shapes)
    if unresolved:
        raise ConfigError(f"input(s) {unresolved} have dynamic dimensions; give them with --shape NAME=DIMS")
    for value in graph_inputs(model):
        if value.name in config.shapes:
            if config.batch != 1 and shapes[value.name][0] != config.batch:
                raise ConfigError(
                    f"--shape {value.name} has batch {shapes[value.name][0]}, --batch says {config.batch}"
                )
            continue
        dims = value_signature(value).shape or []
        if dims and not isinstance(dims[0], int):
            shapes[value.name][0] = config.batch
        elif config.batch != 1 and dims and dims[0] != config.batch:
            raise ConfigError(
                f"input '{value.name}' has a fixed batch size of {dims[0]}; --batch {config.batch} cannot apply"
            )
    return shapes


class _Bar:
    """One tqdm bar on stderr for the whole run; silent when disabled or not a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, file=sys.stderr, disable=None if enabled else True, unit="step", leave=False
        )

    def phase(self, name: str) -> None:
        self._bar.set_description(name)

    def step(self, n: int = 1) -> None:
        if self._bar.total is not None and self._bar.n + n > self._bar.total:
            self._bar.total = self._bar.n + n
        self._bar.update(n)

    def timed_rounds(self, planned: int, min_seconds: float) -> Callable[[int], None]:
        """A progress callback for rounds that may run past ``planned`` until ``min_seconds``.

        The bar's total is re-estimated from the rate so far, so it does not sit at 100%.
        """
        start, done, base = time.perf_counter(), 0, self._bar.total or 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            elapsed = time.perf_counter() - start
            if min_seconds and elapsed > 0.05:
                extra = max(0, int(done * min_seconds / elapsed) + 1 - planned)
                self._bar.total = max(base + extra, self._bar.n + n)
            self.step(n)

        return step

    def close(self) -> None:
        self._bar.close()


def run_bench(paths: list[str], config: BenchConfig) -> dict[str, Any]:
    """Benchmark ``paths[0]`` (the baseline) against the other models; the JSON payload.

    Raises:
        ShrinkError: naming the file it is about (the baseline, unless another is to blame).
    """
    try:
        return _run_bench(paths, config)
    except ShrinkError as exc:
        if exc.path is None and paths and not isinstance(exc, ConfigError) and config.data is None:
            exc.path = str(paths[0])  # e.g. random inputs the baseline's declared shapes make too large
        raise


def _run_bench(paths: list[str], config: BenchConfig) -> dict[str, Any]:
    if not paths:
        raise ConfigError("give at least one model")
    provider_full = resolve_provider(config.provider)
    if config.gates.any() and len(paths) < 2:
        raise ConfigError("gates compare candidates with the baseline: give at least two models")
    load_before = load_average()
    models = [_Model(n, p, *load_model(p)) for n, p in zip(_unique_names(paths), paths)]
    for path in paths:
        check_onnxruntime_survives(path)
    base = models[0]
    base_sigs = {v.name: value_signature(v).dtype for v in graph_inputs(base.proto)}
    for m in models[1:]:
        sigs = {v.name: value_signature(v).dtype for v in graph_inputs(m.proto)}
        if sigs != base_sigs:
            raise ShrinkError(
                f"inputs {sigs} differ from the baseline's {base_sigs}; models must take the same inputs",
                path=m.path,
            )
    notes: list[str] = []
    specs = model_input_specs(base.proto)
    fixed_batch = any(s.shape and isinstance(s.shape[0], int) for s in specs)
    if config.data is None:
        shapes = _input_shapes(base.proto, config)
        dataset: Dataset = RandomDataset(specs, count=config.random_samples, seed=config.seed, shapes=shapes)
        data_kind = "random"
        notes.append(
            "no --data: latency and fidelity use seeded random inputs; agreement, SQNR and cosine "
            "describe behaviour on noise, not on real data, and there is no accuracy"
        )
    else:
        if config.shapes:
            raise ConfigError(
                "--shape sets the shape of random inputs; with --data the samples' shapes are used"
            )
        fixed = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)]
        if fixed and fixed[0] != config.batch:
            raise ConfigError(
                f"the model has a fixed batch size of {fixed[0]}; --batch {config.batch} cannot apply"
            )
        dataset = open_dataset(config.data, base.proto, DataOptions(seed=config.seed))
        data_kind = "labelled" if dataset.has_labels else "unlabelled"
        if len(dataset) < config.batch:
            raise DataError(
                f"holds {len(dataset)} samples, fewer than --batch {config.batch}", path=config.data
            )
    # Random samples are whole batches already; data samples are stacked --batch at a time.
    group = 1 if data_kind == "random" else config.batch
    eval_batches = len(dataset) // group + (0 if fixed_batch or len(dataset) % group == 0 else 1)
    n = len(models)
    total = (
        2 * n + config.warmup + max(config.runs, 3) + eval_batches + n * config.profile + n * config.memory
    )
    bar = _Bar(total, config.progress)
    try:
        with contextlib.ExitStack() as stack:
            bar.phase("sessions")
            for m in models:
                m.source = stack.enter_context(ort_model_source(m.proto))
                t0 = time.perf_counter()
                m.session = make_session(m.source, provider=config.provider, threads=config.threads,
                                         provider_options=config.provider_options)  # fmt: skip
                m.create_ms = (time.perf_counter() - t0) * 1000.0
                require_provider(m.session, provider_full)
                bar.step()
            feeds = [f for f, _ in take_batches(dataset, group, config.latency_feeds, fixed_batch)]
            bar.phase("latency")
            progress = bar.timed_rounds(config.warmup + max(config.runs, 3), config.min_time)
            stats = _timed(models, feeds, config, progress)
            bar.phase("accuracy")
            accuracy, meters, rows = evaluate(
                [m.session for m in models],
                dataset,
                group,
                fixed_batch=fixed_batch,
                data_kind=data_kind,
                step=bar.step,
            )
            if fixed_batch and len(dataset) % group:
                notes.append(
                    f"accuracy: the last {len(dataset) % group} samples were left out (fixed batch size)"
                )
            profiles: list[dict[str, Any] | None] = [None] * n
            if config.profile:
                bar.phase("profile")
                for i, m in enumerate(models):
                    profiles[i] = profile_model(m.source, feeds[0], provider=config.provider, threads=config.threads,
                                                provider_options=config.provider_options,
                                                runs=config.profile_runs).to_json()  # fmt: skip
                    bar.step()
            memory: list[dict[str, Any] | None] = [None] * n
            if config.memory:
                bar.phase("memory")
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxshrink-bench-"))
                feed_path = os.path.join(tmp, "feed.npz")
                np.savez(feed_path, **cast(dict[str, Any], feeds[0]))
                for i, m in enumerate(models):
                    memory[i] = measure_memory(m.path, feed_path, provider=config.provider, threads=config.threads,
                                               provider_options=config.provider_options, runs=config.memory_runs)  # fmt: skip
                    bar.step()
            bar.phase("fusion lint")
            feed_shapes = {k: list(v.shape) for k, v in feeds[0].items()}
            fusion, fusion_note = _fusion_lint(models, config.provider, feed_shapes, bar)
            if fusion_note:
                notes.append(fusion_note)
    finally:
        bar.close()
    batch_rows = int(next(iter(feeds[0].values())).shape[0]) if feeds[0] else config.batch
    entries = []
    for i, m in enumerate(models):
        entry: dict[str, Any] = {
            "name": m.name,
            "path": m.path,
            "role": "baseline" if i == 0 else "candidate",
            "size": {
                "model_file_bytes": m.info.file_bytes,
                "external_data_bytes": m.info.external_bytes,
                "total_bytes": m.info.file_bytes + m.info.external_bytes,
            },
            "session_create_ms": m.create_ms,
            "latency_ms": stats[i].to_json(),
            "throughput_per_s": stats[i].throughput(batch_rows),
            "memory": memory[i],
            "accuracy": accuracy[i],
            "vs_baseline": None if i == 0 else _versus(stats[i], stats[0], meters[i - 1], config.seed),
            "profile": profiles[i],
            "fusion": fusion[i],
        }
        entries.append(entry)
    gate_list = gates_mod.evaluate(config.gates, entries, data_kind=data_kind)
    notes += stability_notes(entries, load_before)
    environment = machine()
    environment["load_average"] = load_before
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "settings": {
            "provider": provider_full,
            "provider_options": dict(config.provider_options),
            "threads": config.threads or None,
            "batch": batch_rows,
            "input_shapes": feed_shapes,
            "warmup": config.warmup,
            "runs": len(stats[0].samples_ms),
            "min_runs": max(config.runs, 3),
            "min_time_s": config.min_time,
            "seed": config.seed,
            "data": {"source": config.data or "random", "kind": data_kind, "samples": rows},
            "memory_runs": config.memory_runs if config.memory else None,
            "profile_runs": config.profile_runs if config.profile else None,
        },
        "models": entries,
        "gates": [g.to_json() for g in gate_list],
        "passed": all(g.passed for g in gate_list),
        "notes": notes,
    }


def _timed(
    models: list[_Model], feeds: list[dict[str, np.ndarray]], config: BenchConfig, progress: Any
) -> list[LatencyStats]:
    try:
        return measure_interleaved([m.session for m in models], feeds, warmup=config.warmup, rounds=config.runs,
                                   min_seconds=config.min_time or None, progress=progress)  # fmt: skip
    except Exception as exc:
        # Which model failed is found by running each once (cheap, and only on this path).
        for m in models:
            try:
                run(m.session, feeds[0])
            except ShrinkError as failed:
                raise ShrinkError(failed.message, path=m.path) from exc
        raise ShrinkError(f"onnxruntime failed while timing: {str(exc).strip().splitlines()[0]}") from exc


def _versus(cand: LatencyStats, base: LatencyStats, meter: FidelityMeter, seed: int) -> dict[str, Any]:
    ratio = cand.p50 / base.p50
    low, high = ratio_interval(cand, base, seed=seed)
    return {
        "latency_ratio": ratio,
        "latency_ratio_ci95": [low, high],
        "latency_ratio_blocks": block_ratios(cand, base),
        "paired_median_ratio": paired_ratio(cand, base),
        "speedup": 1.0 / ratio,
        "fidelity": meter.result().to_json(),
    }


def _fusion_lint(
    models: list[_Model], provider: str, shapes: dict[str, list[int]], bar: _Bar
) -> tuple[list[dict[str, Any] | None], str | None]:
    """The fusion section (:func:`onnxshrink.fusion.analyze_fusion`), one per model.

    A model the lint cannot analyse gets ``None`` and a note; the benchmark stands without it.
    """
    try:
        from onnxshrink import fusion
    except ImportError:  # the lint ships with the package; kept optional for partial builds
        bar.step(len(models))
        return [None] * len(models), "fusion lint: onnxshrink.fusion is not available in this build"
    out: list[dict[str, Any] | None] = []
    failed = []
    for m in models:
        try:
            macs = count_macs(
                m.proto, {k: v for k, v in shapes.items() if k in {i.name for i in graph_inputs(m.proto)}}
            )
            report = fusion.analyze_fusion(m.proto, provider=provider, macs_by_node=macs.by_node)
        except ShrinkError as exc:
            failed.append(f"{m.name} ({exc.one_line()})")
            out.append(None)
            bar.step()
            continue
        out.append({"summary": report.summary(), **report.to_json()})
        bar.step()
    return out, (f"fusion lint failed for: {'; '.join(failed)}" if failed else None)
