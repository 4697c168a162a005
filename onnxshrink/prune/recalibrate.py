"""Re-estimate BatchNormalization statistics after pruning, from a few unlabelled samples.

Pruning shifts the mean and variance of every pre-BN activation, and the stored running
statistics no longer normalise them: the error compounds layer by layer, which is why a
small network can lose most of its accuracy at 50 % sparsity. Measuring the statistics
again on calibration data (no labels, no gradients, no training) removes most of that loss
("adaptive BN", Li et al., EagleEye, 2020).

BatchNormalization nodes are processed in graph order, so each one is measured with every
upstream node already corrected. Models whose BN was folded into the convolutions at export
have nothing to recalibrate; the function then changes nothing and returns 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.data import Sample
from onnxshrink.prune._graph import GraphIndex

log = logging.getLogger(__name__)


def _probe(model: onnx.ModelProto, ix: GraphIndex, tensor: str, elem_type: int) -> onnx.ModelProto:
    """The part of ``model`` that computes ``tensor``, with ``tensor`` as its only output."""
    needed, stack = set(), [tensor]
    while stack:
        producer = ix.producer.get(stack.pop())
        if producer is not None and producer not in needed:
            needed.add(producer)
            stack.extend(n for n in ix.nodes[producer].input if n)
    nodes = [n for k, n in enumerate(ix.nodes) if k in needed]
    read = {n for node in nodes for n in node.input}
    graph = onnx.helper.make_graph(
        nodes,
        "probe",
        [v for v in model.graph.input if v.name in read],
        [onnx.helper.make_tensor_value_info(tensor, elem_type, None)],
        [t for t in model.graph.initializer if t.name in read],
    )
    probe = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    return probe


def recalibrate_batchnorm(
    model: onnx.ModelProto,
    samples: Iterable[Sample | Mapping[str, np.ndarray]],
    *,
    threads: int | None = 1,
) -> int:
    """Set every BatchNormalization's mean and variance to those measured on ``samples``.

    Changes ``model`` in place. Only BN nodes whose statistics are constant initializers
    used by that node alone are updated.

    Args:
        model: the (pruned) model.
        samples: feeds or :class:`~onnxshrink.data.Sample`; a few hundred images suffice.
        threads: onnxruntime intra-op threads.

    Returns:
        How many BatchNormalization nodes were updated.
    """
    from onnxshrink.runtime import make_session, run

    feeds = [s.feeds if isinstance(s, Sample) else dict(s) for s in samples]
    if not feeds:
        return 0
    ix = GraphIndex(model, with_shapes=False)
    updated = 0
    for node in ix.nodes:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 5:
            continue
        mean_name, var_name = node.input[3], node.input[4]
        if any(
            n not in ix.initializers or len(ix.const_uses(n)) != 1 or ix.const_escapes(n)
            for n in (mean_name, var_name)
        ):
            log.info("BatchNormalization '%s' shares its statistics; left as it is", node.name)
            continue
        elem_type = ix.initializers[mean_name].data_type
        session = make_session(_probe(model, ix, node.input[0], elem_type), threads=threads)
        total = total_sq = None
        count = 0
        for feed in feeds:
            x = np.asarray(run(session, feed)[0], dtype=np.float64)
            axes = (0, *range(2, x.ndim))
            s, sq = x.sum(axis=axes), (x * x).sum(axis=axes)
            total = s if total is None else total + s
            total_sq = sq if total_sq is None else total_sq + sq
            count += x.size // x.shape[1]
        assert total is not None and total_sq is not None
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        for name, value in ((mean_name, mean), (var_name, var)):
            old = ix.initializers[name]
            dtype = numpy_helper.to_array(old).dtype
            old.CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
        updated += 1
    return updated
