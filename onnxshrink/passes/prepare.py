"""Graph preparation before quantization: opset upgrade, constant folding, BatchNorm folding,
dead-code removal — each checked to leave the outputs unchanged.

The folding is onnxruntime's own basic-level optimiser (constant folding, Conv+BatchNorm and
Conv+Add/Mul fusion, Identity/Dropout elimination), the same step that ORT's
``quant_pre_process`` runs; it only emits standard ONNX ops. A BatchNormalization left between
a Conv and its Q/DQ pair would keep the Conv from becoming an int8 kernel, so this matters for
speed, not only tidiness. Every result is compared with the input model on real samples; if
the outputs moved by more than a tight tolerance, the step is dropped with a warning rather
than silently changing numerics.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxshrink.data import Sample
from onnxshrink.errors import UnsupportedModelError
from onnxshrink.modelio import load_model
from onnxshrink.passes.cleanup import cleanup, prune_opset_imports
from onnxshrink.passes.rewrite import reduce_mean_to_global_pool
from onnxshrink.runtime import make_session

log = logging.getLogger(__name__)

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
#: Relative tolerance (of the output's largest magnitude) for a lossless step.
LOSSLESS_RTOL = 1e-4


@dataclass
class PrepareReport:
    steps: list[dict[str, Any]] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    #: Steps applied whose equivalence check was left to the caller (``defer_fold_check``):
    #: it must compare the prepared model's outputs on the samples with the reference, and
    #: call :meth:`checked` with the error (or prepare again without deferring).
    unchecked: list[str] = field(default_factory=list)

    def checked(self, error: float) -> None:
        """Record the deferred check's error on the steps that waited for it."""
        for entry in self.steps:
            if entry["step"] in self.unchecked:
                entry["max_relative_error"] = error
                entry["checked"] = "on the calibration pass"
        self.unchecked = []

    def to_json(self) -> dict[str, Any]:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "steps": self.steps}


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def max_relative_error(reference: list[list[Any]], candidate: list[list[Any]]) -> float:
    """Largest |reference - candidate| over outputs and samples, relative to the largest finite |reference|.

    Equal values count as equal even when they are not finite (``inf == inf``, NaN where the
    reference has NaN); a NaN or infinity that the reference does not have is an infinite
    error. Non-numeric outputs (strings) must match exactly, and sequence outputs are
    compared element by element.
    """
    worst = 0.0
    for ref_outputs, cand_outputs in zip(reference, candidate):
        if len(ref_outputs) != len(cand_outputs):
            return float("inf")
        for ra, rb in zip(ref_outputs, cand_outputs):
            worst = max(worst, _output_error(ra, rb))
    return worst


def _output_error(ra: Any, rb: Any) -> float:
    if isinstance(ra, list) or isinstance(rb, list):
        if not (isinstance(ra, list) and isinstance(rb, list)) or len(ra) != len(rb):
            return float("inf")
        return max((_output_error(a, b) for a, b in zip(ra, rb)), default=0.0)
    if ra is None or rb is None:
        return 0.0 if ra is None and rb is None else float("inf")
    ra, rb = np.asarray(ra), np.asarray(rb)
    if ra.shape != rb.shape:
        return float("inf")
    if ra.size == 0:
        return 0.0
    if ra.dtype.kind not in "fiub" or rb.dtype.kind not in "fiub":  # strings, bfloat16/float8 (ml_dtypes)
        return 0.0 if np.array_equal(ra, rb) else float("inf")
    a, b = ra.astype(np.float64), rb.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return 0.0
    finite = np.abs(a[np.isfinite(a)])
    scale = max(float(finite.max()) if finite.size else 0.0, 1e-12)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)[~same]
    diff[~np.isfinite(diff)] = np.inf
    return float(diff.max()) / scale


def outputs_on(model: onnx.ModelProto | str, samples: list[Sample]) -> list[list[np.ndarray]]:
    """``model``'s outputs on ``samples`` (``model``: a proto, or a model file's path)."""
    # Basic optimisations, like the optimising session that gave the reference: the layout
    # changes of the full level copy every Conv weight (ResNet-18: the preparation's memory
    # peak) and take longer to make than they save over a couple of runs.
    session = make_session(model, threads=None, optimization="basic", memory_arena=False)
    return [session.run(None, s.feeds) for s in samples]


def ort_basic_optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's provider-independent (basic) graph optimisations, as a new model."""
    return basic_optimize_with_outputs(model, None)[0]


def basic_optimize_with_outputs(
    model: onnx.ModelProto, samples: list[Sample] | None, source: str | os.PathLike[str] | None = None, *, check: bool = True
) -> tuple[onnx.ModelProto, list[list[np.ndarray]] | None, list[list[np.ndarray]] | None]:
    """:func:`ort_basic_optimize`; with ``samples``, also the outputs on them of ``model``
    (from the optimising session itself) and, if ``check``, of the optimised copy (the
    equivalence check; None otherwise).

    ``source``: the file ``model`` was loaded from, unchanged: onnxruntime reads it itself.
    Both sessions are made from files, and the optimised weights go to a side file: no
    serialised copy of the weights is held beside the model (VGG-16's preparation peak went
    from 3.0 to 2.0 GB).
    """
    with tempfile.TemporaryDirectory(prefix="onnxshrink-prep-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        session = make_session(
            str(source) if source is not None else model,
            threads=None,
            optimization="basic",
            optimized_model_path=target,
            config_entries={
                "session.optimized_model_external_initializers_file_name": "optimized.onnx.data",
                "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
            },
        )
        outputs = [session.run(None, s.feeds) for s in samples] if samples is not None else None
        del session
        # onnxruntime writes dims it does not know as -1 (e.g. in If branches); the loader
        # reads those as unknown (corpus: node/test_affine_grid_3d_expanded).
        optimized, _ = load_model(target, check=False)
        checked = outputs_on(str(target), samples) if samples is not None and check else None
    prune_opset_imports(optimized)
    return optimized, outputs, checked


def _global_pool_rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    if not reduce_mean_to_global_pool(rewritten):
        raise _NothingToDo
    cleanup(rewritten)
    return rewritten


class _NothingToDo(Exception):
    """A preparation step that does not apply to this model."""


def _upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    from onnx import version_converter

    return version_converter.convert_version(model, target)


#: Inputs that hold weights (by position) of the ops whose weights get quantized or folded.
#: A NaN or infinity there makes every scale or folded value invalid.
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
}  # fmt: skip


def check_finite_weights(model: onnx.ModelProto) -> None:
    """Refuse weights holding NaN or infinity (they make every scale invalid).

    Only initializers that a Conv/Gemm/MatMul/normalisation reads as a weight are checked:
    other constants may be non-finite on purpose, such as the ``-inf`` fill value of an
    attention mask (``Where(mask, scores, -inf)``), and are never quantized as weights.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    weights: list[str] = []
    for node in model.graph.node:
        slots = WEIGHT_INPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        for i in slots or ():
            if i < len(node.input) and node.input[i] in initializers and node.input[i] not in weights:
                weights.append(node.input[i])
    for name in weights:
        tensor = initializers[name]
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            values = onnx.numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                raise UnsupportedModelError(f"initializer '{tensor.name}' contains {bad} NaN or infinite value(s)")


def prepare(
    model: onnx.ModelProto,
    samples: list[Sample],
    *,
    reference: list[list[np.ndarray]] | None = None,
    min_opset: int = 13,
) -> tuple[onnx.ModelProto, PrepareReport]:
    """Return a folded, cleaned copy of ``model`` whose outputs match it on ``samples``.

    Args:
        model: the fp32 model (not modified).
        samples: a few samples to check each step on.
        reference: ``model``'s outputs on ``samples`` if already computed.
    """
    prepared, report, _ = prepare_with_reference(model, samples, reference=reference, min_opset=min_opset)
    return prepared, report


def prepare_with_reference(
    model: onnx.ModelProto,
    samples: list[Sample],
    *,
    reference: list[list[np.ndarray]] | None = None,
    min_opset: int = 13,
    source: str | os.PathLike[str] | None = None,
    defer_fold_check: bool = False,
) -> tuple[onnx.ModelProto, PrepareReport, list[list[np.ndarray]]]:
    """:func:`prepare`, also returning ``model``'s outputs on ``samples`` (the reference
    that later rewrites are checked against).

    ``source``: the file ``model`` was loaded from, if ``model`` is that file's model
    unchanged (onnxruntime then reads the file itself: less memory).
    ``defer_fold_check``: the folding's equivalence check is left to the caller, who runs
    the prepared model on ``samples`` anyway (see :attr:`PrepareReport.unchecked`): one
    session and its runs fewer (0.35 s on ConvNeXt-T).
    """
    if is_quantized(model):
        raise UnsupportedModelError("the model is already quantized (it has Q/DQ or QLinear nodes); give the fp32 model")
    check_finite_weights(model)
    report = PrepareReport(nodes_before=len(model.graph.node))
    current = model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), min_opset)
    candidates: list[tuple[str, Any]] = []
    if opset < min_opset:
        candidates.append((f"opset {opset} -> {min_opset}", lambda m: _upgrade_opset(m, min_opset)))
    fold = "fold constants and BatchNorm (onnxruntime basic optimiser)"
    #: Outputs of a step's result already computed (by the step that made it).
    computed: dict[str, list[list[np.ndarray]] | None] = {}
    if reference is None and opset >= min_opset:
        # The optimising session runs the samples too: the reference without a second
        # session on the original (the optimised copy is still checked against it).
        try:
            folded, reference, computed[fold] = basic_optimize_with_outputs(model, samples, source, check=not defer_fold_check)
            candidates.append((fold, lambda m: folded))
        except Exception:  # noqa: BLE001 - retried as a step below (skipped if it fails again)
            reference = None
            computed.clear()
            candidates.append((fold, ort_basic_optimize))
    else:
        candidates.append((fold, ort_basic_optimize))
    if reference is None:
        reference = outputs_on(model, samples)
    candidates.append(("ReduceMean over H,W -> GlobalAveragePool", _global_pool_rewrite))
    deferred = {fold} if defer_fold_check and fold in computed and computed[fold] is None else set()
    for name, step in candidates:
        try:
            candidate = step(current)
            outputs = computed.pop(name, None)
            if name in deferred:
                report.steps.append({"step": name, "applied": True, "nodes": len(candidate.graph.node), "max_relative_error": None})
                report.unchecked.append(name)
                current = candidate
                continue
            error = max_relative_error(reference, outputs if outputs is not None else outputs_on(candidate, samples))
        except _NothingToDo:
            continue
        except Exception as exc:  # noqa: BLE001 - a failed optional step is skipped, not fatal
            first = " ".join(str(exc).split())[:200] if str(exc).strip() else ""
            log.warning("preparation step '%s' failed and was skipped: %s", name, first or type(exc).__name__)
            reason = f"failed: {type(exc).__name__}" + (f": {first}" if first else "")
            report.steps.append({"step": name, "applied": False, "reason": reason})
            continue
        if error > LOSSLESS_RTOL:
            log.warning("preparation step '%s' changed outputs by %.2g (relative); skipped", name, error)
            report.steps.append({"step": name, "applied": False, "reason": f"outputs moved by {error:.2g}"})
            continue
        report.steps.append({"step": name, "applied": True, "nodes": len(candidate.graph.node), "max_relative_error": error})
        current = candidate
    if current is model:
        current = onnx.ModelProto()
        current.CopyFrom(model)
    removed = cleanup(current)
    report.steps.append({"step": "remove dead nodes and unused initializers", "applied": True, **removed})
    report.nodes_after = len(current.graph.node)
    return current, report, reference
