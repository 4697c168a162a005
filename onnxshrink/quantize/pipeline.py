"""The int8 pipeline: prepare -> calibrate -> QDQ -> fusion-aware clean-up -> accuracy fallback.

1. Preparation (folding, clean-up), checked lossless on held-back samples.
2. Streaming calibration of every float activation on the calibration samples.
3. QDQ rewrite (onnxruntime's quantizer as the engine) with per-channel int8 weights and
   uint8 activations by default.
4. Fusion-aware clean-up: the provider's optimised graph is read back; compute nodes it left
   in float between Q/DQ are excluded from quantization, and Q/DQ pairs that would run as
   plain elementwise work are removed — so the model is not slowed down by int8 that the
   provider cannot use.
5. Accuracy target: fidelity against fp32 on held-back samples. If the target is missed,
   nodes are ranked by the noise they add and the fewest are left in fp32 that meet it.
   The best model found is always returned, with the reasons for every fp32 node.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxshrink.data import Dataset, OutlierWatch, Sample
from onnxshrink.errors import DataError, UnsupportedModelError
from onnxshrink.fusion import FusionReport, UnfusedUnit, analyze_fusion
from onnxshrink.passes.cleanup import cleanup
from onnxshrink.modelio import load_model
from onnxshrink.passes.prepare import LOSSLESS_RTOL, PrepareReport, max_relative_error, prepare_with_reference
from onnxshrink.quantize.calibrate import CalibrationPass, choose_range, collect_stats, complete_ranges, concat_ranges_from_inputs
from onnxshrink.quantize.config import Int8Config
from onnxshrink.quantize.engine import build_qdq, decide_reduce_range, ensure_node_names, excluded_nodes
from onnxshrink.quantize.rewrites import int8_friendly, unshare_biases
from onnxshrink.quantize.sensitivity import NodeSensitivity, node_sensitivity
from onnxshrink.runtime import make_session, ordered_runs, pipelined_runs, release_memory
from onnxshrink.stats import count_macs
from onnxshrink.verify import Fidelity, FidelityMeter

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    """Log how long a phase took (``-v`` shows it): where conversion time goes."""
    start = time.perf_counter()
    yield
    log.info("int8: %s took %.2f s", name, time.perf_counter() - start)

#: Target when the user gives none: the top-1 accuracy drop, estimated without labels from the
#: fp32 model's own class probabilities (``Fidelity.expected_drop_points``), at most this many
#: points; or outputs that are not class scores keep at least this SQNR. Plain top-1 agreement
#: is too coarse for a default: on 32 samples one flip is 3 points, and near-tie flips (which
#: an int8 model makes as often as it helps) say nothing about accuracy.
DEFAULT_MAX_DROP = 1.0
DEFAULT_MIN_SQNR = 20.0
#: With the default target, an output SQNR this high also counts as met: top-1 flips at
#: this noise level come from near-ties in the fp32 model itself (e.g. untrained weights).
DEFAULT_SQNR_ALTERNATIVE = 30.0
_FUSION_ROUNDS = 3
_SENSITIVITY_SAMPLES = 8
#: The fallback search builds and judges at most this many candidates.
_MAX_CANDIDATES = 8
#: Calibration and judging run on all cores: measured on 2 cores, never slower from a
#: 20 MMAC model up (MobileNetV3-Large calibration 1.33 s on 1 thread, 1.03-1.12 s on 2;
#: ResNet-50 5.0-6.3 s and 3.7 s). onnxruntime's own calibrator does the same.
_THREADS: int | None = None


@dataclass
class Split:
    """Which samples calibrate and which judge (by position in the data set)."""

    calibration: range
    evaluation: range
    overlap: bool


def split_samples(count: int, max_calibration: int) -> Split:
    """Hold back a fifth (at most 500) for evaluation when there are 50 samples or more."""
    if count >= 50:
        held = min(max(count // 5, 10), 500)
        calib = range(0, min(count - held, max_calibration))
        return Split(calib, range(count - held, count), overlap=False)
    return Split(range(0, min(count, max_calibration)), range(0, count), overlap=True)


def iter_range(dataset: Dataset, indices: range) -> Iterator[Sample]:
    return itertools.islice(iter(dataset), indices.start, indices.stop)


@dataclass
class FallbackNode:
    node: str
    op_type: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason}


@dataclass
class Int8Result:
    """What the int8 pipeline produced and why."""

    model: onnx.ModelProto
    config: Int8Config
    prepare: PrepareReport
    fidelity: Fidelity
    target: dict[str, Any]
    target_met: bool
    fp32_nodes: list[FallbackNode]
    fusion: FusionReport
    sensitivity: list[NodeSensitivity]
    calibration_samples: int
    evaluation_samples: int
    evaluation_overlaps_calibration: bool
    reduce_range: bool
    quantized_nodes: int
    candidates_tried: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "activation_type": self.config.activation_type,
            "weight_type": "int8",
            "per_channel": self.config.per_channel,
            "reduce_range": self.reduce_range,
            "calibration_samples": self.calibration_samples,
            "evaluation_samples": self.evaluation_samples,
            "evaluation_overlaps_calibration": self.evaluation_overlaps_calibration,
            "quantized_nodes": self.quantized_nodes,
            "fp32_nodes": [n.to_json() for n in self.fp32_nodes],
            "target": self.target,
            "target_met": self.target_met,
            "fidelity": self.fidelity.to_json(),
            "fusion": self.fusion.to_json(),
            "sensitivity_top": [s.to_json() for s in self.sensitivity[:10]],
            "candidates_tried": self.candidates_tried,
            "preparation": self.prepare.to_json(),
            "notes": self.notes,
        }


class _Evaluator:
    """Fidelity of candidates against fp32 outputs recorded on the evaluation samples."""

    def __init__(
        self, dataset: Dataset, indices: range, reference: list[list[np.ndarray]], labels: list[int | np.ndarray | None],
        threads: int | None, run_bytes: int | None = None,
    ) -> None:  # fmt: skip
        # ``run_bytes``: a run of the fp32 model; one of the int8 model moves 8-bit activations.
        self.at_once, self.threads = pipelined_runs(threads, None if run_bytes is None else run_bytes // 4)
        self.dataset = dataset
        self.indices = indices
        self.reference = reference
        self.labels = labels

    def __call__(self, candidate: onnx.ModelProto) -> Fidelity:
        session = make_session(candidate, threads=self.threads)
        meter = FidelityMeter()
        feeds = (sample.feeds for sample in iter_range(self.dataset, self.indices))
        for outputs, ref, label in zip(ordered_runs(session, None, feeds, self.at_once), self.reference, self.labels):
            meter.update(ref, outputs, label)
        return meter.result()


def _target(config: Int8Config, classify: bool) -> dict[str, Any]:
    if config.min_sqnr is not None:
        return {"kind": "min_sqnr_db", "value": config.min_sqnr, "default": False}
    if config.max_drop is not None:
        return {"kind": "max_drop_points", "value": config.max_drop, "default": False}
    if classify:
        return {
            "kind": "max_drop_points", "value": DEFAULT_MAX_DROP, "default": True, "estimate": "confidence_weighted",
            "or_min_sqnr_db": DEFAULT_SQNR_ALTERNATIVE,
        }
    return {"kind": "min_sqnr_db", "value": DEFAULT_MIN_SQNR, "default": True}


def _drop_points(fidelity: Fidelity, target: dict[str, Any]) -> float:
    """The drop the target is about: task accuracy with labels; else the default target's
    confidence-weighted estimate (if the output SQNR is at least ``DEFAULT_MIN_SQNR``), or
    plain top-1 disagreement (an explicit ``--max-drop``, or outputs further off)."""
    if fidelity.accuracy_drop_points is not None:
        return fidelity.accuracy_drop_points
    if (
        target.get("estimate") == "confidence_weighted"
        and fidelity.expected_drop_points is not None
        and fidelity.sqnr_db >= DEFAULT_MIN_SQNR
    ):
        # Only while the outputs stay close: softmax of an output with a small spread that
        # is not logits (an embedding, a cosine head) is near uniform, and would excuse
        # any number of flips.
        return fidelity.expected_drop_points
    if fidelity.top1_agreement is not None:
        return 100.0 * (1.0 - fidelity.top1_agreement)
    return math.inf


def _meets(fidelity: Fidelity, target: dict[str, Any]) -> bool:
    if target["kind"] == "min_sqnr_db":
        return fidelity.sqnr_db >= target["value"]
    if target.get("default") and fidelity.accuracy_reference is None and fidelity.sqnr_db >= DEFAULT_SQNR_ALTERNATIVE:
        return True
    return _drop_points(fidelity, target) <= target["value"] + 1e-9


def _score(fidelity: Fidelity, target: dict[str, Any]) -> float:
    """Higher is better, in the target's own terms."""
    return fidelity.sqnr_db if target["kind"] == "min_sqnr_db" else -_drop_points(fidelity, target)


def remove_redundant_qdq(model: onnx.ModelProto, quantize_nodes: list[str]) -> int:
    """Bypass the named QuantizeLinear nodes and the DequantizeLinear nodes that read them."""
    names = set(quantize_nodes)
    rename: dict[str, str] = {}
    drop: set[str] = set()
    by_name = {n.name: n for n in model.graph.node}
    graph_outputs = {o.name for o in model.graph.output}
    for name in names:
        q = by_name.get(name)
        if q is None or q.op_type != "QuantizeLinear":
            continue
        readers = [n for n in model.graph.node if q.output[0] in n.input]
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        if any(r.output[0] in graph_outputs for r in readers) or q.output[0] in graph_outputs:
            continue
        drop.add(q.name)
        for r in readers:
            drop.add(r.name)
            rename[r.output[0]] = q.input[0]
    if not drop:
        return 0
    keep = [n for n in model.graph.node if n.name not in drop]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    cleanup(model)
    return len([n for n in drop if by_name[n].op_type == "QuantizeLinear"])


def _unfused_macs(report: FusionReport) -> int:
    return sum(u.macs for u in report.unfused)


def _count_quantized(model: onnx.ModelProto) -> int:
    """Compute nodes that read at least one dequantized activation."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input))


def quantize_int8(
    model: onnx.ModelProto,
    dataset: Dataset,
    config: Int8Config | None = None,
    *,
    progress: bool = False,
    source: str | os.PathLike[str] | None = None,
    source_shapes: Callable[[], dict[str, list[int | str | None]] | None] | None = None,
) -> Int8Result:
    """Quantize ``model`` to static int8 QDQ, calibrated and checked on ``dataset``.

    ``source``: the file ``model`` was loaded from, if ``model`` is that file's model
    unchanged: the preparation's sessions then read files, not serialised copies (memory).
    ``source_shapes``: gives ``model``'s symbolic shapes (:func:`onnxshrink.stats.shapes_for_folding`),
    if they were worked out elsewhere (a forked child: time, and memory).
    """
    config = config or Int8Config()
    count = len(dataset)
    if count == 0:
        raise DataError("the calibration data holds no samples")
    not_tensors = [o.name for o in model.graph.output if not o.type.HasField("tensor_type")]
    if not_tensors:
        raise UnsupportedModelError(f"int8 needs tensor outputs; output '{not_tensors[0]}' is a sequence, map or optional")
    split = split_samples(count, config.max_calibration_samples)
    checks = list(iter_range(dataset, range(split.evaluation.start, split.evaluation.start + min(2, len(split.evaluation)))))
    method = "mse" if config.method == "auto" else config.method
    threads = _THREADS
    span = range(min(split.calibration.start, split.evaluation.start), max(split.calibration.stop, split.evaluation.stop))

    def prepare_model(box: list[onnx.ModelProto], defer: bool) -> tuple[onnx.ModelProto, PrepareReport, list[list[np.ndarray]]]:
        # ``box`` holds the only reference, dropped once prepared (memory).
        # ``reference``: the original's outputs on ``checks``; every rewrite is checked against them.
        prepared, prep_report, reference = prepare_with_reference(box.pop(), checks, source=source, defer_fold_check=defer)
        if config.provider == "cpu":
            prepared, steps = int8_friendly(prepared, checks, reference, shapes=source_shapes)
            prep_report.steps += steps
        copies = unshare_biases(prepared)  # the same values under new names: nothing to check
        if copies:
            prep_report.steps.append({"step": "shared Conv/Gemm bias -> a copy each (an int32 bias each)", "applied": True, "nodes": copies})
        ensure_node_names(prepared)
        release_memory()
        return prepared, prep_report, reference

    def calibrate(prepared: onnx.ModelProto) -> CalibrationPass:
        # One pass over the data: statistics on the calibration samples, fp32 outputs (of the
        # prepared model, equal to the original's within 1e-4) on the evaluation samples.
        outliers = OutlierWatch(dataset.source)
        calibration = collect_stats(
            prepared,
            outliers.watch(iter_range(dataset, span)),
            histogram=method != "minmax",
            calibrate=range(split.calibration.start - span.start, split.calibration.stop - span.start),
            record=range(split.evaluation.start - span.start, split.evaluation.stop - span.start),
            quantized_op_types=config.quantized_op_types,
            progress=progress,
            threads=threads,
        )
        outliers.check()
        return calibration

    # With the file at hand (to prepare again from), the folding's equivalence check waits
    # for the calibration pass, which runs the prepared model on ``checks`` anyway.
    box = [model]
    del model  # the caller may have handed over its only reference
    with _phase("preparation"):
        prepared, prep_report, reference = prepare_model(box, defer=source is not None)
    with _phase("calibration"):
        calibration = calibrate(prepared)
    if prep_report.unchecked:
        error = max_relative_error(reference, calibration.recorded_outputs[: len(checks)])
        if error <= LOSSLESS_RTOL:
            prep_report.checked(error)
        else:
            log.warning("onnxruntime's folding changed the outputs by %.2g (relative): preparing again, each step checked", error)
            assert source is not None
            del calibration, prepared
            with _phase("preparation (again)"):
                prepared, prep_report, reference = prepare_model([load_model(source)[0]], defer=False)
            with _phase("calibration (again)"):
                calibration = calibrate(prepared)
    with _phase("MAC count"):
        macs = count_macs(prepared)
    ranges = {name: choose_range(s, method, percentile=config.percentile) for name, s in calibration.stats.items()}
    complete_ranges(ranges, calibration.derived)
    concat_ranges_from_inputs(prepared, ranges)
    evaluate = _Evaluator(dataset, split.evaluation, calibration.recorded_outputs, calibration.recorded_labels, threads, calibration.run_bytes)
    del calibration
    release_memory()

    classify = bool(evaluate.reference) and evaluate.reference[0][0].ndim == 2 and evaluate.reference[0][0].shape[1] > 1
    target = _target(config, classify)

    user_excluded = excluded_nodes(prepared, config.exclude)
    fp32_nodes = [FallbackNode(n, _op(prepared, n), "excluded by --exclude") for n in user_excluded]

    def build(extra_exclude: list[str]) -> tuple[onnx.ModelProto, FusionReport, list[FallbackNode]]:
        """QDQ model with fusion-aware exclusions on top of ``extra_exclude``."""
        excluded = list(dict.fromkeys(user_excluded + extra_exclude))
        fusion_excluded: list[FallbackNode] = []
        candidate = build_qdq(prepared, ranges, config, exclude=excluded)
        report = analyze_fusion(candidate, provider=config.provider, macs_by_node=macs.by_node)
        ours = {n.name for n in prepared.graph.node}
        quantizable = set(config.quantized_op_types)

        def unfused_of(rep: FusionReport) -> list[UnfusedUnit]:
            return [u for u in rep.unfused if u.node in ours and u.node not in excluded and u.op_type in quantizable]

        for _ in range(_FUSION_ROUNDS if config.fusion_aware else 0):
            unfused = unfused_of(report)
            if not unfused:
                break
            trial_excluded = excluded + [u.node for u in unfused]
            trial = build_qdq(prepared, ranges, config, exclude=trial_excluded)
            trial_report = analyze_fusion(trial, provider=config.provider, macs_by_node=macs.by_node)
            # Dropping a unit's Q/DQ can leave its neighbours unfusable in turn; keep a
            # round only if it leaves fewer float MACs between Q/DQ than before.
            if _unfused_macs(trial_report) > _unfused_macs(report) or len(trial_report.unfused) > len(report.unfused):
                break
            excluded = trial_excluded
            fusion_excluded += [
                FallbackNode(u.node, u.op_type, f"{config.provider} provider has no int8 kernel for it here (unfused)") for u in unfused
            ]
            candidate, report = trial, trial_report
        if config.fusion_aware and report.redundant_qdq_pairs:
            if remove_redundant_qdq(candidate, report.redundant_qdq_pairs):
                report = analyze_fusion(candidate, provider=config.provider, macs_by_node=macs.by_node)
        return candidate, report, fusion_excluded

    with _phase("QDQ build and fusion check"):
        candidate, fusion, fusion_fallback = build([])
    with _phase("fidelity check"):
        fidelity = evaluate(candidate)
    tried = 1
    sensitivity: list[NodeSensitivity] = []
    accuracy_fallback: list[FallbackNode] = []
    if not _meets(fidelity, target):
        sample_count = min(_SENSITIVITY_SAMPLES, len(split.evaluation))
        probe = list(iter_range(dataset, range(split.evaluation.start, split.evaluation.start + sample_count)))
        sensitivity = node_sensitivity(prepared, candidate, probe)
        ranked = [s for s in sensitivity if s.node not in user_excluded]
        # k -> (score, fidelity, met) for every candidate judged; k=0 is the start. Models
        # are kept only for the two that can still be chosen (the fewest fp32 nodes that
        # meet the target, the best score), not for every candidate.
        judged: dict[int, tuple[float, Fidelity, bool]] = {0: (_score(fidelity, target), fidelity, False)}
        kept: dict[int, tuple[onnx.ModelProto, FusionReport, list[FallbackNode]]] = {0: (candidate, fusion, fusion_fallback)}
        del candidate

        def attempt(k: int) -> bool:
            if len(judged) >= _MAX_CANDIDATES:
                return False
            kept[k] = build([s.node for s in ranked[:k]])
            fid = evaluate(kept[k][0])
            judged[k] = (_score(fid, target), fid, _meets(fid, target))
            wanted = {max(judged, key=lambda key: judged[key][0])}
            wanted |= {min((key for key in judged if judged[key][2]), default=0)}
            for key in [key for key in kept if key not in wanted]:
                del kept[key]
            release_memory()
            return judged[k][2]

        # Exponential, then binary search for the fewest fp32 nodes that meet the target.
        lo, hi, k = 0, None, 1
        while k < len(ranked) and hi is None:
            if attempt(k):
                hi = k
            else:
                lo, k = k, k * 2
        if hi is None and ranked and attempt(len(ranked)):
            hi = len(ranked)
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if attempt(mid) else (mid, hi)
            choice = hi
        else:
            choice = max(judged, key=lambda key: judged[key][0])
        tried = len(judged)
        candidate, fusion, fusion_fallback = kept.pop(choice)
        fidelity = judged[choice][1]
        kept.clear()
        for s in ranked[:choice]:
            accuracy_fallback.append(
                FallbackNode(s.node, s.op_type, f"accuracy: adds {s.added_noise_db:.1f} dB of noise (output SQNR {s.output_sqnr_db:.1f} dB)")
            )
    met = _meets(fidelity, target)
    result = Int8Result(
        model=candidate,
        config=config,
        prepare=prep_report,
        fidelity=fidelity,
        target=target,
        target_met=met,
        fp32_nodes=fp32_nodes + accuracy_fallback + fusion_fallback,
        fusion=fusion,
        sensitivity=sensitivity,
        calibration_samples=len(split.calibration),
        evaluation_samples=len(split.evaluation),
        evaluation_overlaps_calibration=split.overlap,
        reduce_range=decide_reduce_range(config),
        quantized_nodes=_count_quantized(candidate),
        candidates_tried=tried,
    )
    if split.overlap:
        result.notes.append(f"only {count} samples: fidelity is measured on the calibration samples themselves (give 50 or more to hold some back)")
    if not met:
        result.notes.append("the accuracy target was not met even with fp32 fallback; this is the most accurate model found")
    return result


def _op(model: onnx.ModelProto, name: str) -> str:
    return next((n.op_type for n in model.graph.node if n.name == name), "?")
