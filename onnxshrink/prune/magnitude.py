"""Unstructured magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights.

``prune_magnitude`` sets the smallest-magnitude weights to exactly ``+0.0``, **in place**,
and returns a :class:`~onnxshrink.prune.report.MagnitudePruneReport`. With a ``sparsity``
the count is exact: ``round(sparsity * n)`` elements of each weight (``scope="layer"``) or
of all eligible weights together (``scope="global"``, one threshold for all; elements tied
at the threshold are zeroed in graph order until the count is reached). With a
``threshold`` every ``|w| < threshold`` is zeroed.

A weight is eligible when it is a floating-point initializer and every use of it (through
Identity copies) is the weight input of a Conv, ConvTranspose, Gemm or MatMul: a tensor
that is also added, multiplied or returned is not a weight and stays untouched. By default
the first and last eligible weights in graph order stay dense too.

ONNX Runtime runs unstructured zeros at dense speed; what this buys is compressibility
(the report gives gzip sizes) and a starting point for sparse runtimes.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.data import Sample
from onnxshrink.errors import UnsupportedModelError
from onnxshrink.prune._graph import FLOAT_TYPES, GraphIndex, count_parameters, require_weights
from onnxshrink.prune.config import MagnitudePruneConfig, pattern_matches
from onnxshrink.prune.report import UNSTRUCTURED_NOTE, LayerSparsity, MagnitudePruneReport
from onnxshrink.verify import Fidelity, FidelityMeter

log = logging.getLogger(__name__)

#: Ops whose input 1 is a weight magnitude pruning may sparsify.
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Weight:
    """An eligible weight initializer and the nodes that use it."""

    name: str
    nodes: list[str]
    op_type: str
    skipped: str | None = None


def find_weights(model: onnx.ModelProto) -> list[Weight]:
    """Every weight initializer of a Conv/ConvTranspose/Gemm/MatMul, in graph order.

    Weights that cannot be pruned safely come with ``skipped`` set (shared with a non-weight
    use, not floating point, a graph output); the caller adds its own skip reasons.
    """
    ix = GraphIndex(model, with_shapes=False)
    found: dict[str, Weight] = {}
    for i, node in enumerate(ix.nodes):
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        source = ix.const_source(node.input[1])
        if source is None or source not in ix.initializers:
            continue
        if source in found:
            found[source].nodes.append(ix.key(i))
            continue
        weight = Weight(source, [ix.key(i)], node.op_type)
        uses = ix.const_uses(source)
        if ix.initializers[source].data_type not in FLOAT_TYPES:
            weight.skipped = "not a floating-point tensor"
        elif ix.const_escapes(source):
            weight.skipped = "is a graph output or read by a subgraph"
        elif any(ix.nodes[k].op_type not in WEIGHT_OPS or j != 1 for k, j in uses):
            other = next(ix.key(k) for k, j in uses if ix.nodes[k].op_type not in WEIGHT_OPS or j != 1)
            weight.skipped = f"also used by '{other}', not as a weight"
        found[source] = weight
    return list(found.values())


def _select(model: onnx.ModelProto, config: MagnitudePruneConfig) -> list[Weight]:
    weights = find_weights(model)
    eligible = [w for w in weights if w.skipped is None]
    if not config.include_first_last and eligible:
        eligible[0].skipped = "first weighted layer (include_first_last=False)"
        eligible[-1].skipped = "last weighted layer (include_first_last=False)"
    for w in weights:
        if w.skipped is None:
            for pattern in config.exclude:
                hit = pattern_matches(pattern, [w.name, *w.nodes])
                if hit is not None:
                    w.skipped = f"excluded by pattern '{pattern}'"
                    break
    return weights


def require_finite(name: str, array: np.ndarray, what: str) -> None:
    """Refuse a weight holding NaN or inf: no magnitude ranking of it means anything."""
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise UnsupportedModelError(f"weight '{name}' contains {bad} NaN or infinite value(s); {what} cannot rank it")


def _zero_smallest(array: np.ndarray, count: int) -> np.ndarray:
    """A copy of ``array`` with its ``count`` smallest magnitudes set to +0.0."""
    flat = array.reshape(-1).copy()
    if count > 0:
        magnitude = np.abs(flat.astype(np.float32, copy=False))
        idx = np.argpartition(magnitude, count - 1)[:count] if count < flat.size else np.arange(flat.size)
        flat[idx] = 0
    return flat.reshape(array.shape)


def _zeros(array: np.ndarray) -> int:
    return int(np.count_nonzero(array == 0))


def gzip_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model after gzip (level 6, no timestamp)."""
    return len(gzip.compress(model.SerializeToString(), compresslevel=6, mtime=0))


def prune_magnitude(model: onnx.ModelProto, config: MagnitudePruneConfig) -> MagnitudePruneReport:
    """Zero the smallest weights of ``model``, in place, as ``config`` asks.

    Returns:
        The report: per-layer and overall sparsity, gzip sizes before and after.
    """
    require_weights(model)
    weights = _select(model, config)
    inits = {t.name: t for t in model.graph.initializer}
    params_before, bytes_before, gzip_before = count_parameters(model), model.ByteSize(), gzip_size(model)
    arrays = {w.name: numpy_helper.to_array(inits[w.name]) for w in weights}
    chosen = [w for w in weights if w.skipped is None]
    for w in chosen:
        require_finite(w.name, arrays[w.name], "magnitude pruning")
    new: dict[str, np.ndarray] = {}
    threshold: float | None = None
    if config.threshold is not None:
        threshold = float(config.threshold)
        for w in chosen:
            a = arrays[w.name]
            new[w.name] = np.where(np.abs(a) < threshold, np.zeros_like(a), a)
    elif config.scope == "layer":
        assert config.sparsity is not None
        for w in chosen:
            a = arrays[w.name]
            new[w.name] = _zero_smallest(a, int(round(config.sparsity * a.size)))
    else:
        assert config.sparsity is not None
        new, threshold = _global(arrays, chosen, config.sparsity)
    for name, array in new.items():
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(arrays[name].dtype, copy=False), name))
    layers = []
    for w in weights:
        a = arrays[w.name]
        after = new.get(w.name, a)
        layers.append(
            LayerSparsity(
                w.nodes,
                w.op_type,
                w.name,
                int(a.size),
                _zeros(a) / max(a.size, 1),
                _zeros(after) / max(a.size, 1),
                w.skipped,
            )
        )
    pruned_total = sum(arrays[w.name].size for w in chosen)
    all_total = sum(a.size for a in arrays.values())
    zeros_pruned = sum(_zeros(new[w.name]) for w in chosen)
    zeros_all = zeros_pruned + sum(_zeros(arrays[w.name]) for w in weights if w.skipped is not None)
    return MagnitudePruneReport(
        method="magnitude",
        config=config.to_dict(),
        modified=bool(new),
        params_before=params_before,
        params_after=count_parameters(model),
        bytes_before=bytes_before,
        bytes_after=model.ByteSize(),
        notes=[UNSTRUCTURED_NOTE],
        layers=layers,
        sparsity=zeros_pruned / pruned_total if pruned_total else 0.0,
        weight_sparsity=zeros_all / all_total if all_total else 0.0,
        threshold=threshold,
        gzip_before=gzip_before,
        gzip_after=gzip_size(model) if new else gzip_before,
    )


def _global(
    arrays: Mapping[str, np.ndarray], chosen: list[Weight], sparsity: float
) -> tuple[dict[str, np.ndarray], float | None]:
    """One magnitude threshold for all chosen weights; ties are zeroed in graph order."""
    total = sum(arrays[w.name].size for w in chosen)
    count = int(round(sparsity * total))
    if count == 0 or total == 0:
        return {w.name: arrays[w.name] for w in chosen}, None
    magnitudes = np.concatenate(
        [np.abs(arrays[w.name].astype(np.float32, copy=False)).reshape(-1) for w in chosen]
    )
    threshold = float(np.partition(magnitudes, count - 1)[count - 1])
    del magnitudes
    out: dict[str, np.ndarray] = {}
    remaining = count
    below: dict[str, np.ndarray] = {}
    for w in chosen:
        below[w.name] = np.abs(arrays[w.name].astype(np.float32, copy=False)) < threshold
        remaining -= int(below[w.name].sum())
    for w in chosen:
        a = arrays[w.name]
        mask = below[w.name]
        if remaining > 0:
            ties = np.flatnonzero(np.abs(a.astype(np.float32, copy=False)).reshape(-1) == threshold)[
                :remaining
            ]
            mask = mask.copy()
            mask.reshape(-1)[ties] = True
            remaining -= len(ties)
        out[w.name] = np.where(mask, np.zeros_like(a), a)
    return out, threshold


# --------------------------------------------------------------------------- sensitivity


@dataclass
class LayerSensitivity:
    """How much pruning one weight alone changes the model's outputs."""

    nodes: list[str]
    op_type: str
    weight: str
    params: int
    sparsity: float
    fidelity: Fidelity

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "op_type": self.op_type,
            "weight": self.weight,
            "params": self.params,
            "sparsity": self.sparsity,
            "fidelity": self.fidelity.to_json(),
        }


def magnitude_sensitivity(
    model: onnx.ModelProto,
    samples: Iterable[Sample | Mapping[str, np.ndarray]],
    sparsity: float,
    *,
    exclude: tuple[str, ...] = (),
    threads: int | None = 1,
) -> list[LayerSensitivity]:
    """Prune each eligible weight alone at ``sparsity`` and measure the output fidelity.

    Every weight is tried, the first and last included (the point is to find the sensitive
    ones). Fidelity (SQNR, cosine, top-1 agreement; accuracy when samples carry labels)
    is measured with onnxruntime against the unpruned model on ``samples``. The model is
    left as it was.

    Args:
        model: the model.
        samples: feeds (or :class:`~onnxshrink.data.Sample`); materialised, keep it small.
        sparsity: fraction of each weight to zero.
        exclude: name patterns of weights or nodes not to try.
        threads: onnxruntime intra-op threads.

    Returns:
        One entry per weight tried, in graph order.
    """
    from onnxshrink.runtime import make_session, run

    config = MagnitudePruneConfig(sparsity=sparsity, exclude=exclude, include_first_last=True)
    inits = {t.name: t for t in model.graph.initializer}
    for w in _select(model, config):
        if w.skipped is None:
            require_finite(w.name, numpy_helper.to_array(inits[w.name]), "magnitude pruning")
    feeds = [s if isinstance(s, Sample) else Sample(dict(s)) for s in samples]
    reference = make_session(model, threads=threads)
    expected = [run(reference, s.feeds) for s in feeds]
    inits = {t.name: t for t in model.graph.initializer}
    results = []
    for w in _select(model, config):
        if w.skipped is not None:
            continue
        tensor = inits[w.name]
        saved = onnx.TensorProto()
        saved.CopyFrom(tensor)
        original = numpy_helper.to_array(saved)
        pruned = _zero_smallest(original, int(round(sparsity * original.size)))
        try:
            tensor.CopyFrom(numpy_helper.from_array(pruned, w.name))
            session = make_session(model, threads=threads)
        finally:
            tensor.CopyFrom(saved)
        meter = FidelityMeter()
        for sample, ref in zip(feeds, expected):
            meter.update(ref, run(session, sample.feeds), label=sample.label)
        results.append(
            LayerSensitivity(
                w.nodes,
                w.op_type,
                w.name,
                int(original.size),
                _zeros(pruned) / max(original.size, 1),
                meter.result(),
            )
        )
    return results
