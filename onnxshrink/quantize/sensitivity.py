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
from onnx import compose, helper

from onnxshrink.data import Sample
from onnxshrink.errors import ShrinkError
from onnxshrink.runtime import make_session
from onnxshrink.verify import FidelityMeter, sqnr_from_energies

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
    try:
        sqnr_of = _sqnr_in_graph(fp32, qdq, views_of, samples)
    except ShrinkError:
        # The two graphs could not be joined into one session (e.g. names that clash in
        # subgraphs): compare exposed activations in Python instead, one sample at a time.
        sqnr_of = _sqnr_exposed(fp32, qdq, views_of, samples)

    def sqnr(tensor: str) -> float:
        return sqnr_of.get(tensor, math.inf)

    cache: dict[str, float] = {}
    ranked = []
    for node, ins, out in quantized_nodes:
        for t in [*ins, out]:
            if t not in cache:
                cache[t] = sqnr(t)
        ranked.append(NodeSensitivity(node.name, node.op_type, min(cache[t] for t in ins), cache[out]))
    ranked.sort(key=lambda s: (-s.added_noise_db, s.output_sqnr_db))
    return ranked


def _sqnr_in_graph(fp32: onnx.ModelProto, qdq: onnx.ModelProto, views_of: dict[str, str], samples: list[Sample]) -> dict[str, float]:
    """Per-tensor SQNR computed inside onnxruntime, on one model holding both graphs.

    Each tensor pair becomes two scalars (sum of squares of the fp32 tensor and of the
    difference), so no activation leaves the session and onnxruntime reuses their buffers:
    memory stays near one inference of each model instead of every activation of both.
    """
    inputs = {value.name for value in fp32.graph.input}
    joined = onnx.ModelProto()
    graph = joined.graph
    graph.CopyFrom(fp32.graph)
    # Both graphs read the same inputs; everything else gets the graph's prefix.
    compose.add_prefix_graph(graph, "ref/", rename_inputs=False, inplace=True)
    quantized = onnx.GraphProto()
    quantized.CopyFrom(qdq.graph)
    compose.add_prefix_graph(quantized, "q/", rename_inputs=False, inplace=True)
    graph.node.extend(quantized.node)
    graph.initializer.extend(quantized.initializer)
    graph.sparse_initializer.extend(quantized.sparse_initializer)
    del quantized, graph.output[:], graph.value_info[:]

    def named(prefix: str, tensor: str) -> str:
        return tensor if tensor in inputs else prefix + tensor

    # Comparisons in the fp32 graph's order: onnxruntime then runs each pair's producers
    # close together, and frees both activations soon after.
    position = {name: i for i, node in enumerate(fp32.graph.node) for name in node.output}
    outputs: dict[str, tuple[str, str]] = {}
    for i, (tensor, view) in enumerate(sorted(views_of.items(), key=lambda item: (position.get(item[0], -1), item[0]))):
        ref, cand = named("ref/", tensor), named("q/", view)
        signal, noise, diff = f"sens/{i}/signal", f"sens/{i}/noise", f"sens/{i}/diff"
        graph.node.extend(
            [
                helper.make_node("Sub", [ref, cand], [diff]),
                helper.make_node("ReduceSumSquare", [diff], [noise], keepdims=0),
                helper.make_node("ReduceSumSquare", [ref], [signal], keepdims=0),
            ]
        )
        graph.output.extend([helper.make_empty_tensor_value_info(signal), helper.make_empty_tensor_value_info(noise)])
        outputs[tensor] = (signal, noise)
    opsets: dict[str, int] = {}
    for entry in [*fp32.opset_import, *qdq.opset_import]:
        opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    joined.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    joined.ir_version = max(fp32.ir_version, qdq.ir_version)
    joined.functions.extend(fp32.functions)
    session = make_session(joined, threads=1, optimization="basic", memory_arena=False, memory_pattern=False)
    del joined
    names = [o.name for o in session.get_outputs()]
    sums = {name: 0.0 for name in names}
    for sample in samples:
        for name, value in zip(names, session.run(names, sample.feeds)):
            sums[name] += float(value)
    return {tensor: sqnr_from_energies(sums[signal], sums[noise]) for tensor, (signal, noise) in outputs.items()}


def _sqnr_exposed(fp32: onnx.ModelProto, qdq: onnx.ModelProto, views_of: dict[str, str], samples: list[Sample]) -> dict[str, float]:
    """Per-tensor SQNR from every activation of both models exposed as outputs."""
    tensors = sorted(views_of)
    reference_session = _exposed_session(fp32, tensors)
    candidate_session = _exposed_session(qdq, sorted(set(views_of.values())))
    ref_names = [o.name for o in reference_session.get_outputs()]
    cand_names = [o.name for o in candidate_session.get_outputs()]
    meters = {t: FidelityMeter() for t in tensors}
    for sample in samples:
        ref = dict(zip(ref_names, reference_session.run(ref_names, sample.feeds)))
        cand = dict(zip(cand_names, candidate_session.run(cand_names, sample.feeds)))
        for t in tensors:
            a, b = ref.get(t), cand.get(views_of[t])
            if a is not None and b is not None and np.shape(a) == np.shape(b):
                meters[t].update([a], [b])
        del ref, cand
    return {t: meter.result().sqnr_db for t, meter in meters.items() if meter.samples}
