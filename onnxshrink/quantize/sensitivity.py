"""Which quantized nodes hurt accuracy most, measured inside the model.

Both the fp32 and the QDQ model are run on a few samples with every activation exposed. For
each quantized node we compare, against fp32, the SQNR of its (dequantized) inputs with the
SQNR of its (dequantized) output: the difference is the noise that node adds — its weights'
rounding, its output's clipping and rounding. A detection head whose output range is huge, or
a layer with an outlier channel, shows up at the top. One pass, no re-quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxshrink.data import Sample
from onnxshrink.runtime import make_session
from onnxshrink.verify import FidelityMeter

_QDQ = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class NodeSensitivity:
    node: str
    op_type: str
    input_sqnr_db: float
    output_sqnr_db: float

    @property
    def added_noise_db(self) -> float:
        if math.isinf(self.input_sqnr_db) and math.isinf(self.output_sqnr_db):
            return 0.0
        if math.isinf(self.input_sqnr_db):
            return 120.0 - min(self.output_sqnr_db, 120.0)
        return self.input_sqnr_db - self.output_sqnr_db

    def to_json(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return round(x, 2) if math.isfinite(x) else None

        return {
            "node": self.node,
            "op_type": self.op_type,
            "input_sqnr_db": num(self.input_sqnr_db),
            "output_sqnr_db": num(self.output_sqnr_db),
            "added_noise_db": num(self.added_noise_db),
        }


def _dequantized_views(qdq: onnx.ModelProto) -> dict[str, str]:
    """fp32 tensor name -> name of its dequantized copy in the QDQ model."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    views: dict[str, str] = {}
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = producers.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            views.setdefault(q.input[0], node.output[0])
    return views


def _exposed_session(model: onnx.ModelProto, names: list[str]) -> Any:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    return make_session(exposed, threads=1, optimization="basic")


def node_sensitivity(fp32: onnx.ModelProto, qdq: onnx.ModelProto, samples: list[Sample]) -> list[NodeSensitivity]:
    """Quantized compute nodes of ``qdq`` ranked by the noise they add, worst first."""
    views = _dequantized_views(qdq)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    fp32_tensors = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}
    quantized_nodes: list[tuple[onnx.NodeProto, list[str], str]] = []
    for node in qdq.graph.node:
        if node.op_type in _QDQ:
            continue
        ins = []
        for name in node.input:
            src = producers.get(name)
            if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in producers:
                q = producers[src.input[0]]
                if q.op_type == "QuantizeLinear" and q.input[0] in fp32_tensors:
                    ins.append(q.input[0])
        out = node.output[0] if node.output else ""
        if ins and out in fp32_tensors:
            quantized_nodes.append((node, ins, out))
    if not quantized_nodes:
        return []
    tensors = sorted({t for _, ins, out in quantized_nodes for t in [*ins, out]})
    views_of = {t: views.get(t, t) for t in tensors}
    reference_session = _exposed_session(fp32, tensors)
    candidate_session = _exposed_session(qdq, sorted(set(views_of.values())))
    ref_names = [o.name for o in reference_session.get_outputs()]
    cand_names = [o.name for o in candidate_session.get_outputs()]
    meters = {t: FidelityMeter() for t in tensors}
    # Stream: one sample's activations of both models in memory at a time.
    for sample in samples:
        ref = dict(zip(ref_names, reference_session.run(ref_names, sample.feeds)))
        cand = dict(zip(cand_names, candidate_session.run(cand_names, sample.feeds)))
        for t in tensors:
            a, b = ref.get(t), cand.get(views_of[t])
            if a is not None and b is not None and np.shape(a) == np.shape(b):
                meters[t].update([a], [b])
        del ref, cand

    def sqnr(tensor: str) -> float:
        meter = meters[tensor]
        return meter.result().sqnr_db if meter.samples else math.inf

    cache: dict[str, float] = {}
    ranked = []
    for node, ins, out in quantized_nodes:
        for t in [*ins, out]:
            if t not in cache:
                cache[t] = sqnr(t)
        ranked.append(NodeSensitivity(node.name, node.op_type, min(cache[t] for t in ins), cache[out]))
    ranked.sort(key=lambda s: (-s.added_noise_db, s.output_sqnr_db))
    return ranked
