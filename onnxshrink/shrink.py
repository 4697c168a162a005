"""The main verb: compress a model (prune, quantize) and measure what it gained and lost.

``shrink`` loads the model safely, applies the requested steps in order, measures the result
against the original on the same machine (latency interleaved, fidelity on held-back data),
writes the output atomically and returns an :class:`ShrinkOutcome` that renders as a table
or JSON. Steps are composable: pruning runs before quantization.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxshrink import __version__
from onnxshrink.bench.timing import measure_interleaved, paired_ratio
from onnxshrink.data import DataOptions, Dataset, open_dataset
from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.modelio import check_output_path, load_model, save_model
from onnxshrink.quantize import Int8Config, Int8Result, quantize_int8
from onnxshrink.runtime import make_session
from onnxshrink.stats import count_macs

log = logging.getLogger(__name__)

#: Version of the JSON layout printed by ``onnxshrink shrink --json``.
SHRINK_SCHEMA = "onnxshrink.shrink/1"


@dataclass(frozen=True, kw_only=True)
class ShrinkOptions:
    """What ``shrink`` should do (the CLI flags, typed)."""

    quantize: str | None = "int8"  # "int8" or None
    int8: Int8Config = field(default_factory=Int8Config)
    calibration: str | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    measure_latency: bool = True
    threads: int = 1
    latency_rounds: int = 30
    progress: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize must be int8 or none, not {self.quantize!r}")


@dataclass
class LatencyComparison:
    provider: str
    threads: int
    rounds: int
    baseline_p50_ms: float
    candidate_p50_ms: float
    ratio: float  # candidate / baseline, median of paired rounds

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "threads": self.threads,
            "rounds": self.rounds,
            "baseline_p50_ms": round(self.baseline_p50_ms, 4),
            "candidate_p50_ms": round(self.candidate_p50_ms, 4),
            "ratio": round(self.ratio, 4),
            "speedup": round(1.0 / self.ratio, 4) if self.ratio > 0 else None,
        }


@dataclass
class ShrinkOutcome:
    input_path: str
    output_path: str
    size_before: int
    size_after: int
    macs_before: int | None
    macs_after: int | None
    params_before: int
    params_after: int
    steps: list[str]
    int8: Int8Result | None
    latency: LatencyComparison | None
    wall_seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)

    @property
    def gate_failed(self) -> bool:
        """A target the user asked for explicitly was not met."""
        return self.int8 is not None and not self.int8.target_met and not self.int8.target.get("default", False)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SHRINK_SCHEMA,
            "onnxshrink_version": __version__,
            "input": self.input_path,
            "output": self.output_path,
            "steps": self.steps,
            "size": {"before_bytes": self.size_before, "after_bytes": self.size_after, "ratio": round(self.size_after / max(self.size_before, 1), 4)},
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "parameters": {"before": self.params_before, "after": self.params_after},
            "int8": self.int8.to_json() if self.int8 else None,
            "latency": self.latency.to_json() if self.latency else None,
            "conversion": {"wall_seconds": round(self.wall_seconds, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)},
            "warnings": self.warnings,
            "gate_failed": self.gate_failed,
        }


def _file_size(path: Path, model: onnx.ModelProto | None = None) -> int:
    from onnxshrink.modelio import external_location, iter_tensors

    total = path.stat().st_size
    if model is not None:
        seen = set()
        for t, _ in iter_tensors(model):
            loc = external_location(t).get("location")
            if loc and loc not in seen and (path.parent / loc).exists():
                seen.add(loc)
                total += (path.parent / loc).stat().st_size
    return total


def _params(model: onnx.ModelProto) -> int:
    import math

    from onnx import TensorProto

    skip = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL, TensorProto.STRING}
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type not in skip)


def compare_latency(
    baseline: onnx.ModelProto, candidate: onnx.ModelProto, dataset: Dataset, *, provider: str = "cpu", threads: int = 1, rounds: int = 30
) -> LatencyComparison:
    """Interleaved latency of two models on the same feeds, in one process."""
    feeds = [s.feeds for s in dataset.take(min(4, len(dataset)))]
    sessions = [make_session(m, provider=provider, threads=threads) for m in (baseline, candidate)]
    stats = measure_interleaved(sessions, feeds, warmup=5, rounds=rounds, max_seconds=60.0)
    return LatencyComparison(provider, threads, len(stats[0].samples_ms), stats[0].p50, stats[1].p50, paired_ratio(stats[1], stats[0]))


def shrink(model_path: str | os.PathLike[str], output_path: str | os.PathLike[str], options: ShrinkOptions) -> ShrinkOutcome:
    """Compress ``model_path`` into ``output_path`` and measure the result.

    Raises:
        ShrinkError: with the file it is about (the model, unless the data is to blame).
    """
    try:
        return _shrink(Path(model_path), Path(output_path), options)
    except ShrinkError as exc:
        if exc.path is None and not isinstance(exc, ConfigError):
            exc.path = str(model_path)
        raise


def _shrink(model_path: Path, output_path: Path, options: ShrinkOptions) -> ShrinkOutcome:
    start = time.perf_counter()
    check_output_path(output_path, input_path=model_path)
    original, info = load_model(model_path)
    if options.quantize is None:
        raise ConfigError("nothing to do: give --quantize int8 (or a pruning option)")
    if options.calibration is None:
        raise ConfigError("--calib DATA is required to quantize: a .npz file, a folder of .npz or images, or 'random'")
    dataset = open_dataset(options.calibration, original, options.data_options)
    steps: list[str] = []
    warnings: list[str] = []
    current = original
    int8_result = None
    if options.quantize == "int8":
        int8_result = quantize_int8(current, dataset, options.int8, progress=options.progress)
        current = int8_result.model
        steps.append("quantize.int8")
        warnings += int8_result.notes
    _stamp_metadata(current, steps)
    save_model(current, output_path, input_path=model_path)
    convert_seconds = time.perf_counter() - start
    convert_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    latency = None
    if options.measure_latency:
        latency = compare_latency(original, current, dataset, provider=options.int8.provider, threads=options.threads, rounds=options.latency_rounds)
        if latency.ratio > 1.0:
            cause = int8_result.fusion.summary() if int8_result else ""
            warnings.append(
                f"the compressed model is SLOWER than the original on {latency.provider} "
                f"({latency.ratio:.2f}x the latency). Fusion lint: {cause}"
            )
    macs_before = count_macs(original).total
    macs_after = macs_before  # quantization keeps MACs; pruning (when given) changes them
    return ShrinkOutcome(
        input_path=str(model_path),
        output_path=str(output_path),
        size_before=info.file_bytes + info.external_bytes,
        size_after=_file_size(output_path, current),
        macs_before=macs_before,
        macs_after=macs_after,
        params_before=_params(original),
        params_after=_params(current),
        steps=steps,
        int8=int8_result,
        latency=latency,
        wall_seconds=convert_seconds,
        peak_rss_mb=convert_rss,
        warnings=warnings,
    )


def _stamp_metadata(model: onnx.ModelProto, steps: list[str]) -> None:
    """Record what made the model (kept small: names and versions only)."""
    import onnxruntime

    entries = {"onnxshrink.version": __version__, "onnxshrink.steps": ",".join(steps), "onnxshrink.onnxruntime": onnxruntime.__version__}
    kept = [p for p in model.metadata_props if not p.key.startswith("onnxshrink.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
