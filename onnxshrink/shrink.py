"""The main verb: compress a model (prune, quantize) and measure what it gained and lost.

``shrink`` loads the model safely, applies the requested steps in order, measures the result
against the original on the same machine (latency interleaved, fidelity on held-back data),
writes the output atomically and returns an :class:`ShrinkOutcome` that renders as a table
or JSON. Steps are composable: pruning runs before quantization.
"""

from __future__ import annotations

import hashlib
import itertools
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
from onnxshrink import prune  # its passes are imported when a pruning step runs
from onnxshrink.prune import ChannelPruneConfig, MagnitudePruneConfig
from onnxshrink.quantize import Int8Config, Int8Result, quantize_int8
from onnxshrink.passes.prepare import prepare
from onnxshrink.quantize.pipeline import iter_range, split_samples
from onnxshrink.recipe.recipe import DataSpec, Recipe
from onnxshrink.recipe.steps import BenchStep, ChannelPruneStep, DistillStep, FoldStep, Int8Step, MagnitudePruneStep
from onnxshrink.runtime import CrashProbe, ForkedJob, make_session
from onnxshrink.stats import count_macs, count_parameters, shapes_for_folding
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
    pruning: list[prune.PruneReport]
    fidelity: Fidelity | None  # end to end against the original (when pruning changed it)
    magnitude_sensitivity: list[prune.LayerSensitivity]
    fidelity_on_random: bool
    latency: LatencyComparison | None
    wall_seconds: float
    peak_rss_mb: float
    warnings: list[str] = field(default_factory=list)
    recipe: Recipe | None = None
    input_sha256: str | None = None
    distill: list[dict[str, Any]] = field(default_factory=list)
    gates_failed: list[str] = field(default_factory=list)  # gates other than the int8 target

    @property
    def int8_gate_failed(self) -> bool:
        """The int8 accuracy target that the user asked for explicitly was not met."""
        return self.int8 is not None and not self.int8.target_met and not self.int8.target.get("default", False)

    @property
    def gate_failed(self) -> bool:
        """A target the user asked for explicitly was not met."""
        return self.int8_gate_failed or bool(self.gates_failed)

    def gate_message(self) -> str:
        """One line naming every failed gate."""
        parts = list(self.gates_failed)
        if self.int8_gate_failed:
            assert self.int8 is not None
            parts.insert(0, f"accuracy target {self.int8.target['kind']} {self.int8.target['value']} not met")
        return "; ".join(parts) + "; best model written anyway"

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SHRINK_SCHEMA,
            "onnxshrink_version": __version__,
            "input": self.input_path,
            "input_sha256": self.input_sha256,
            "output": self.output_path,
            "recipe": self.recipe.to_dict() if self.recipe else None,
            "steps": self.steps,
            "size": {"before_bytes": self.size_before, "after_bytes": self.size_after, "ratio": round(self.size_after / max(self.size_before, 1), 4)},
            "macs": {"before": self.macs_before, "after": self.macs_after},
            "parameters": {"before": self.params_before, "after": self.params_after},
            "pruning": [r.to_json() for r in self.pruning],
            "fidelity": self.fidelity.to_json() if self.fidelity else None,
            "magnitude_sensitivity": [s.to_json() for s in self.magnitude_sensitivity],
            "fidelity_on_random_inputs": self.fidelity_on_random,
            "int8": self.int8.to_json() if self.int8 else None,
            "distill": self.distill,
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

    The options are compiled into a :class:`~onnxshrink.recipe.Recipe`
    (:func:`recipe_from_options`) and run by :func:`run_recipe`, so ``shrink`` and
    ``onnxshrink run`` give the same bytes for the same steps.

    Raises:
        ShrinkError: with the file it is about (the model, unless the data is to blame).
    """
    return run_recipe(recipe_from_options(options), model_path, output_path, progress=options.progress)


def recipe_from_options(options: ShrinkOptions) -> Recipe:
    """The recipe that ``shrink`` with these options runs (``--save-recipe``, ``--dry-run``)."""
    steps: list[Any] = []
    if options.channels is not None:
        # With both prunings, BatchNorm is re-measured once, after the last one.
        recal = False if options.magnitude is not None else options.recalibrate_bn
        steps.append(ChannelPruneStep(config=options.channels, recalibrate_bn=recal, recalibration_samples=_RECALIBRATION_SAMPLES))
    if options.magnitude is not None:
        steps.append(MagnitudePruneStep(config=options.magnitude, recalibrate_bn=options.recalibrate_bn, recalibration_samples=_RECALIBRATION_SAMPLES))
    if options.quantize == "int8":
        steps.append(Int8Step(config=options.int8))
    if options.measure_latency:
        steps.append(BenchStep(provider=options.int8.provider, threads=options.threads, rounds=options.latency_rounds))
    d, p = options.data_options, options.data_options.preprocess
    calibration = options.calibration
    if calibration is not None and calibration != "random":
        calibration = os.path.abspath(calibration)
    data = DataSpec(
        calibration=calibration, seed=d.seed, shapes={k: tuple(v) for k, v in d.shapes.items()},
        image_size=tuple(p.size) if p.size else None, layout=p.layout,  # type: ignore[arg-type]
        mean=tuple(p.mean), std=tuple(p.std), scale=p.scale, color=p.mode,  # type: ignore[arg-type]
    )
    return Recipe(steps=tuple(steps), data=data)


def run_recipe(
    recipe: Recipe,
    model_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    calibration: str | None = None,
    progress: bool = False,
    measure: bool = True,
) -> ShrinkOutcome:
    """Apply ``recipe``'s steps to ``model_path``, write ``output_path``, measure.

    ``calibration`` overrides the recipe's ``data.calibration``; ``measure=False`` skips
    the ``bench`` step (the output is the same: timing never changes the model). The same recipe, model and
    data give byte-identical output (every step is deterministic and single-threaded where
    it reduces numbers); the output's metadata records the recipe, the versions and the
    input model's sha256.

    Raises:
        ShrinkError: with the file it is about (the model, unless the data is to blame).
    """
    if calibration is not None:
        recipe = recipe.with_calibration(calibration)
    try:
        pipeline = _Pipeline(recipe, Path(model_path), Path(output_path), progress, measure)
        try:
            return pipeline.run()
        finally:
            pipeline._cancel_jobs()  # not asked for (no Shape left to fold), or a failure
    except ShrinkError as exc:
        if exc.path is None and not isinstance(exc, ConfigError):
            exc.path = str(model_path)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Pipeline:
    """One run of a recipe: the steps in order, each a method ``_<type>``; then save, bench."""

    def __init__(self, recipe: Recipe, model_path: Path, output_path: Path, progress: bool, measure: bool) -> None:
        self.recipe, self.model_path, self.output_path, self.progress = recipe, model_path, output_path, progress
        self.measure = measure
        self.steps: list[str] = []
        self.warnings: list[str] = []
        self.pruning: list[prune.PruneReport] = []
        self.sensitivity: list[prune.LayerSensitivity] = []
        self.int8: Int8Result | None = None
        self.distilled: list[dict[str, Any]] = []
        self.gates: list[str] = []
        self.shapes_job: ForkedJob | None = None
        self.macs_job: ForkedJob | None = None
        self.source_stamp: tuple[int, int, int] | None = None

    def run(self) -> ShrinkOutcome:
        start = time.perf_counter()
        recipe = self.recipe
        check_output_path(self.output_path, input_path=self.model_path)
        stamp = _file_stamp(self.model_path)
        original, info = load_model(self.model_path)  # refuses FIFOs, devices, ... first
        # The int8 step may hand onnxruntime the file itself (less memory) if it is still the
        # model as loaded: unchanged by loading, and not changed on disk since.
        if not info.changed_on_load and stamp is not None and _file_stamp(self.model_path) == stamp:
            self.source_stamp = stamp
        # Runs the MAC count's shape inference and a first session in a child, while the work
        # below, which needs neither, goes on.
        probe = CrashProbe(self.model_path, original)
        try:
            # int8 first: the symbolic shapes its Shape folding starts from, worked out in
            # another child meanwhile (sympy: 0.4 s and 33 MiB that stay out of this process).
            int8_first = bool(recipe.steps) and recipe.steps[0].type == "quantize.int8"
            if int8_first and any(n.op_type in ("Shape", "Size") for n in original.graph.node):
                self.shapes_job = ForkedJob(shapes_for_folding, original)
            self.input_sha256 = file_sha256(self.model_path)
            source = recipe.data.calibration
            if source is None and recipe.int8 is not None:
                raise ConfigError("--calib DATA is required to quantize: a .npz file, a folder of .npz or images, or 'random'")
            self.on_random = source is None or source == "random"
            self.data_options = recipe.data.data_options()
            if source is None:
                d = self.data_options
                self.dataset: Dataset = RandomDataset(model_input_specs(original), count=8, seed=d.seed, shapes=d.shapes)
            else:
                self.dataset = open_dataset(source, original, self.data_options)
            params_before = count_parameters(original)
        except BaseException:
            probe.cancel()
            raise
        probe.wait()
        macs_before: int | None = None
        if probe.mac_total is None:
            macs_before = count_macs(original).total
        elif probe.mac_total[0] is not None:
            macs_before = probe.mac_total[0]
        else:
            # Shapes computed at run time: symbolic inference knows them. It runs in a child
            # beside the steps, and is read back for the report.
            self.macs_job = ForkedJob(_mac_total, original)
        # The original is kept for the end-to-end fidelity when a step other than int8
        # changes the numbers; otherwise int8 gets the only reference (memory).
        changes = [s.type for s in recipe.steps if s.type in ("prune.channels", "prune.magnitude", "distill")]
        self.original: onnx.ModelProto | None = original if changes else None
        self.current: onnx.ModelProto | None = original
        self.private = False  # whether self.current may be changed in place
        del original
        for step in recipe.steps:
            if step.type != "bench":
                getattr(self, "_" + step.type.replace(".", "_"))(step)
        assert self.current is not None
        current = self.current
        fidelity = None
        if self.original is not None:
            fidelity = end_to_end_fidelity(self.original, current, self.dataset)
            if self.on_random:
                self.warnings.append("fidelity was measured on random inputs: it says nothing about accuracy; give --calib DATA")
        _stamp_metadata(current, self.steps, recipe=recipe, input_sha256=self.input_sha256, data_sha256=self._data_sha256(source))
        save_model(current, self.output_path, input_path=self.model_path)
        if self.macs_job is not None:
            job, self.macs_job = self.macs_job, None
            macs_before = job.result()
        convert_seconds = time.perf_counter() - start
        convert_rss = peak_rss_mb()
        latency = None
        bench = recipe.bench
        if bench is not None and self.measure:
            latency = compare_latency(self.model_path, current, self.dataset, provider=bench.provider, threads=bench.threads, rounds=bench.rounds)
            if latency.ratio > 1.0:
                cause = f" Fusion lint: {self.int8.fusion.summary()}" if self.int8 else ""
                self.warnings.append(f"the compressed model is SLOWER than the original on {latency.provider} ({latency.ratio:.2f}x the latency).{cause}")
            if bench.min_speedup is not None and latency.ratio > 0 and 1.0 / latency.ratio < bench.min_speedup:
                self.gates.append(f"speed-up {1.0 / latency.ratio:.2f}x is below --min-speedup {bench.min_speedup}")
        if any(isinstance(r, prune.MagnitudePruneReport) for r in self.pruning):
            self.warnings.append("magnitude pruning makes the file compress better (gzip) but gives no speed-up in ONNX Runtime, whose kernels are dense; use --prune-channels for speed")
        return ShrinkOutcome(
            input_path=str(self.model_path),
            output_path=str(self.output_path),
            size_before=info.file_bytes + info.external_bytes,
            size_after=_stored_size(self.output_path),
            macs_before=macs_before,
            macs_after=count_macs(current).total,
            params_before=params_before,
            params_after=count_parameters(current),
            steps=self.steps,
            int8=self.int8,
            pruning=self.pruning,
            fidelity=fidelity,
            magnitude_sensitivity=self.sensitivity,
            fidelity_on_random=self.on_random,
            latency=latency,
            wall_seconds=convert_seconds,
            peak_rss_mb=convert_rss,
            warnings=self.warnings,
            recipe=recipe,
            input_sha256=self.input_sha256,
            distill=self.distilled,
            gates_failed=self.gates,
        )

    @staticmethod
    def _data_sha256(source: str | None) -> str | None:
        return file_sha256(source) if source and source != "random" and os.path.isfile(source) else None

    def _writable(self) -> onnx.ModelProto:
        """The current model, copied first if it is still the original."""
        assert self.current is not None
        if not self.private:
            copy = onnx.ModelProto()
            copy.CopyFrom(self.current)
            self.current, self.private = copy, True
        return self.current

    def _recalibrate(self, step: ChannelPruneStep | MagnitudePruneStep) -> None:
        model = self._writable()
        has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
        wanted = step.recalibrate_bn if step.recalibrate_bn is not None else not self.on_random
        if wanted and has_bn:
            # One thread: reductions then add up in the same order on every machine.
            samples = self.dataset.take(min(len(self.dataset), step.recalibration_samples))
            count = prune.recalibrate_batchnorm(model, samples, threads=1)
            self.steps.append(f"recalibrate.batchnorm({count})")

    def _fold(self, step: FoldStep) -> None:
        assert self.current is not None
        split = split_samples(len(self.dataset), len(self.dataset))
        checks = list(iter_range(self.dataset, range(split.evaluation.start, split.evaluation.start + min(2, len(split.evaluation)))))
        self.current, report = prepare(self.current, checks, min_opset=step.min_opset)
        self.private = True
        self.steps.append("fold")
        for entry in report.steps:
            if not entry.get("applied", True):
                self.warnings.append(f"fold: '{entry['step']}' skipped ({entry.get('reason')})")

    def _prune_channels(self, step: ChannelPruneStep) -> None:
        # The channel analysis trusts the graph's shapes; a graph that cannot run (a weight
        # that does not fit its input, which the checker and session creation let by) must
        # fail here in one line rather than inside the surgery.
        make_session(self.current, threads=1).run(None, next(iter(self.dataset)).feeds)
        self.pruning.append(prune.prune_channels(self._writable(), step.config))
        self.steps.append("prune.channels")
        self._recalibrate(step)

    def _prune_magnitude(self, step: MagnitudePruneStep) -> None:
        model = self._writable()
        config = step.config
        if step.sensitivity and config.sparsity is not None and not self.on_random:
            # Before pruning: where would this sparsity hurt, layer by layer? (report only)
            probe = self.dataset.take(min(len(self.dataset), _SENSITIVITY_SAMPLES))
            self.sensitivity = prune.magnitude_sensitivity(model, probe, config.sparsity, exclude=config.exclude, threads=None)
        self.pruning.append(prune.prune_magnitude(model, config))
        self.steps.append("prune.magnitude")
        self._recalibrate(step)

    def _cancel_jobs(self) -> None:
        for name in ("shapes_job", "macs_job"):
            job = getattr(self, name)
            setattr(self, name, None)
            if job is not None:
                job.cancel()

    def _quantize_int8(self, step: Int8Step) -> None:
        if self.on_random and self.recipe.data.calibration is None:
            raise ConfigError("--calib DATA is required to quantize")
        # Hand the quantizer the only reference when nothing else needs this model.
        box = [self.current]
        self.current = None
        # As the first step it works on the file's model as loaded: the shapes worked out
        # for it apply, and onnxruntime may read the file itself if it is that model.
        on_original = not self.steps
        job, self.shapes_job = self.shapes_job, None
        shapes = (lambda: job.result()) if on_original and job is not None else None
        same_file = on_original and self.source_stamp is not None and _file_stamp(self.model_path) == self.source_stamp
        try:
            result = quantize_int8(
                box.pop(), self.dataset, step.config, progress=self.progress,  # type: ignore[arg-type]
                source=self.model_path if same_file else None, source_shapes=shapes,
            )  # fmt: skip
        finally:
            if job is not None:
                job.cancel()
        self.current, self.private, self.int8 = result.model, True, result
        self.steps.append("quantize.int8")
        self.warnings += result.notes

    def _distill(self, step: DistillStep) -> None:
        from onnxshrink.distill import distill

        assert self.current is not None
        source = step.data or self.recipe.data.calibration
        if source is None or source == "random":
            raise ConfigError("distill needs data: give the step a 'data' file or the recipe calibration data")
        train = open_dataset(source, self.current, self.data_options)
        samples = itertools.islice(iter(train), step.max_samples) if step.max_samples else iter(train)
        extra = open_dataset(step.eval, self.current, self.data_options) if step.eval else None
        result = distill(
            self.model_path, self.current, samples,
            epochs=step.epochs, lr=step.lr, schedule=step.schedule, batch_size=step.batch_size,
            temperature=step.temperature, alpha=step.alpha, l1=step.l1, l2=step.l2, use_labels=step.use_labels,
            seed=step.seed, val_fraction=step.val_fraction, patience=step.patience, monitor=step.monitor,
            mixup=step.mixup, eval_dataset=extra, threads=1, progress=self.progress,
        )  # fmt: skip
        self.current, self.private = result.model, True
        self.distilled.append(result.to_json())
        self.steps.append("distill")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of ``path``: whether it is still the file that was loaded."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _mac_total(model: onnx.ModelProto) -> int | None:
    return count_macs(model).total


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


def end_to_end_fidelity(original: onnx.ModelProto, compressed: onnx.ModelProto, dataset: Dataset) -> Fidelity:
    """Fidelity of ``compressed`` against ``original`` on the held-back samples."""
    split = split_samples(len(dataset), len(dataset))
    reference, candidate = make_session(original, threads=None), make_session(compressed, threads=None)
    meter = FidelityMeter()
    for sample in iter_range(dataset, split.evaluation):
        meter.update(reference.run(None, sample.feeds), candidate.run(None, sample.feeds), sample.label)
    return meter.result()


def _stamp_metadata(
    model: onnx.ModelProto,
    steps: list[str],
    *,
    recipe: Recipe | None = None,
    input_sha256: str | None = None,
    data_sha256: str | None = None,
) -> None:
    """Record what made the model: versions, steps, the recipe (compact JSON, no paths) and
    the input model's (and calibration file's) sha256 — nothing that varies between runs."""
    import onnxruntime

    entries = {"onnxshrink.version": __version__, "onnxshrink.steps": ",".join(steps), "onnxshrink.onnxruntime": onnxruntime.__version__}
    if recipe is not None:
        entries["onnxshrink.recipe"] = recipe.stamp()
    if input_sha256 is not None:
        entries["onnxshrink.input_sha256"] = input_sha256
    if data_sha256 is not None:
        entries["onnxshrink.data_sha256"] = data_sha256
    kept = [p for p in model.metadata_props if not p.key.startswith("onnxshrink.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
