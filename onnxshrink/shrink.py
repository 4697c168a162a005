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
from onnxshrink.data import DataOptions, Dataset, RandomDataset, model_input_specs, open_dataset
from onnxshrink.errors import ConfigError, ShrinkError
from onnxshrink.modelio import check_output_path, load_model, save_model
from onnxshrink.prune import (
    ChannelPruneConfig,
    LayerSensitivity,
    MagnitudePruneConfig,
    MagnitudePruneReport,
    PruneReport,
    magnitude_sensitivity,
    prune_channels,
    prune_magnitude,
    recalibrate_batchnorm,
)
from onnxshrink.quantize import Int8Config, Int8Result, quantize_int8
from onnxshrink.quantize.pipeline import iter_range, split_samples
from onnxshrink.runtime import make_session
from onnxshrink.stats import count_macs, count_parameters
from onnxshrink.verify import Fidelity, FidelityMeter

log = logging.getLogger(__name__)

#: Version of the JSON layout printed by ``onnxshrink shrink --json``.
SHRINK_SCHEMA = "onnxshrink.shrink/1"


@dataclass(frozen=True, kw_only=True)
class ShrinkOptions:
    """What ``shrink`` should do (the CLI flags, typed)."""

    quantize: str | None = "int8"  # "int8" or None
    int8: Int8Config = field(default_factory=Int8Config)
    channels: ChannelPruneConfig | None = None
    magnitude: MagnitudePruneConfig | None = None
    recalibrate_bn: bool | None = None  # None: after pruning, when data is given and BN is present
    calibration: str | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    measure_latency: bool = True
    threads: int = 1
    latency_rounds: int = 30
    progress: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize must be int8 or none, not {self.quantize!r}")
        if self.quantize is None and self.channels is None and self.magnitude is None:
            raise ConfigError("nothing to do: give --quantize int8 and/or a pruning option (--prune-channels, --prune-magnitude)")

    @property
    def prunes(self) -> bool:
        return self.channels is not None or self.magnitude is not None


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
    pruning: list[PruneReport]
    fidelity: Fidelity | None  # end to end against the original (when pruning changed it)
    magnitude_sensitivity: list[LayerSensitivity]
    fidelity_on_random: bool
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
            "pruning": [r.to_json() for r in self.pruning],
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
            "magnitude_sensitivity": [s.to_json() for s in self.magnitude_sensitivity],
            "fidelity_on_random_inputs": self.fidelity_on_random,
            "int8": self.int8.to_json() if self.int8 else None,
            "latency": self.latency.to_json() if self.latency else None,
            "conversion": {"wall_seconds": round(self.wall_seconds, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)},
            "warnings": self.warnings,
            "gate_failed": self.gate_failed,
        }


def _stored_size(path: Path) -> int:
    """Bytes on disk of a model file and its external data (read back, weights untouched)."""
    _, info = load_model(path, load_weights=False, check=False, lift_constants=False)
    return info.file_bytes + info.external_bytes


def compare_latency(
    baseline: onnx.ModelProto | Path, candidate: onnx.ModelProto, dataset: Dataset, *, provider: str = "cpu", threads: int = 1, rounds: int = 30
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
    if options.calibration is None and options.quantize is not None:
        raise ConfigError("--calib DATA is required to quantize: a .npz file, a folder of .npz or images, or 'random'")
    on_random = options.calibration is None or options.calibration == "random"
    if options.calibration is None:
        dataset: Dataset = RandomDataset(model_input_specs(original), count=8, seed=options.data_options.seed, shapes=options.data_options.shapes)
    else:
        dataset = open_dataset(options.calibration, original, options.data_options)
    macs_before = count_macs(original).total
    params_before = count_parameters(original)
    steps: list[str] = []
    warnings: list[str] = []
    pruning: list[PruneReport] = []
    sensitivity: list[LayerSensitivity] = []
    current = original
    if options.prunes:
        current = onnx.ModelProto()
        current.CopyFrom(original)
        if options.channels is not None:
            pruning.append(prune_channels(current, options.channels))
            steps.append("prune.channels")
        if options.magnitude is not None:
            if options.magnitude.sparsity is not None and not on_random:
                # Before pruning: where would this sparsity hurt, layer by layer?
                probe = dataset.take(min(len(dataset), _SENSITIVITY_SAMPLES))
                sensitivity = magnitude_sensitivity(current, probe, options.magnitude.sparsity, exclude=options.magnitude.exclude, threads=None)
            pruning.append(prune_magnitude(current, options.magnitude))
            steps.append("prune.magnitude")
        if _should_recalibrate(options, current, on_random):
            count = recalibrate_batchnorm(current, dataset.take(min(len(dataset), _RECALIBRATION_SAMPLES)), threads=None)
            steps.append(f"recalibrate.batchnorm({count})")
    int8_result = None
    if options.quantize == "int8":
        if not options.prunes:
            # quantize_int8 makes its own prepared copy; without pruning nothing here needs
            # the original any more (timing reloads it from disk), so let it go.
            box, current, original = [current], None, None  # type: ignore[assignment]
            int8_result = quantize_int8(box.pop(), dataset, options.int8, progress=options.progress)
        else:
            int8_result = quantize_int8(current, dataset, options.int8, progress=options.progress)
        current = int8_result.model
        steps.append("quantize.int8")
        warnings += int8_result.notes
    fidelity = None
    if options.prunes:
        fidelity = end_to_end_fidelity(original, current, dataset)
        if on_random:
            warnings.append("fidelity was measured on random inputs: it says nothing about accuracy; give --calib DATA")
    _stamp_metadata(current, steps)
    save_model(current, output_path, input_path=model_path)
    convert_seconds = time.perf_counter() - start
    convert_rss = peak_rss_mb()
    latency = None
    if options.measure_latency:
        provider = options.int8.provider
        latency = compare_latency(model_path, current, dataset, provider=provider, threads=options.threads, rounds=options.latency_rounds)
        if latency.ratio > 1.0:
            cause = f" Fusion lint: {int8_result.fusion.summary()}" if int8_result else ""
            warnings.append(f"the compressed model is SLOWER than the original on {latency.provider} ({latency.ratio:.2f}x the latency).{cause}")
    if any(isinstance(r, MagnitudePruneReport) for r in pruning):
        warnings.append("magnitude pruning makes the file compress better (gzip) but gives no speed-up in ONNX Runtime, whose kernels are dense; use --prune-channels for speed")
    return ShrinkOutcome(
        input_path=str(model_path),
        output_path=str(output_path),
        size_before=info.file_bytes + info.external_bytes,
        size_after=_stored_size(output_path),
        macs_before=macs_before,
        macs_after=count_macs(current).total,
        params_before=params_before,
        params_after=count_parameters(current),
        steps=steps,
        int8=int8_result,
        pruning=pruning,
        fidelity=fidelity,
        magnitude_sensitivity=sensitivity,
        fidelity_on_random=on_random,
        latency=latency,
        wall_seconds=convert_seconds,
        peak_rss_mb=convert_rss,
        warnings=warnings,
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    ``VmHWM`` belongs to the current address space; ``ru_maxrss`` would also count a parent's
    memory inherited across fork and exec (a CLI started by a large process reports the
    parent's size).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_RECALIBRATION_SAMPLES = 256
_SENSITIVITY_SAMPLES = 32


def _should_recalibrate(options: ShrinkOptions, model: onnx.ModelProto, on_random: bool) -> bool:
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if options.recalibrate_bn is not None:
        return options.recalibrate_bn and has_bn
    return has_bn and not on_random


def end_to_end_fidelity(original: onnx.ModelProto, compressed: onnx.ModelProto, dataset: Dataset) -> Fidelity:
    """Fidelity of ``compressed`` against ``original`` on the held-back samples."""
    split = split_samples(len(dataset), len(dataset))
    reference, candidate = make_session(original, threads=None), make_session(compressed, threads=None)
    meter = FidelityMeter()
    for sample in iter_range(dataset, split.evaluation):
        meter.update(reference.run(None, sample.feeds), candidate.run(None, sample.feeds), sample.label)
    return meter.result()


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
