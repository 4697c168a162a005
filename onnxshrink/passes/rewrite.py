"""Small lossless rewrites that let onnxruntime pick faster (and int8) kernels."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from onnxshrink.stats import infer_shapes, weightless_copy


def _axes(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "axes":
            return list(attr.ints)
    if len(node.input) > 1 and node.input[1]:
        tensor = initializers.get(node.input[1])
        return None if tensor is None else [int(a) for a in numpy_helper.to_array(tensor).reshape(-1)]
    return None


def reduce_mean_to_global_pool(model: onnx.ModelProto) -> int:
    """``ReduceMean(x, axes=[2, 3])`` on a 4-D tensor -> ``GlobalAveragePool(x)`` (then
    ``Flatten`` when ``keepdims=0``).

    The dynamo exporter writes adaptive average pooling as ReduceMean; onnxruntime has an
    int8 kernel (and NCHWc fp32 kernels) for GlobalAveragePool but not for ReduceMean.
    Returns the number of nodes rewritten (in place).
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    candidates = [n for n in graph.node if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx")]
    if not candidates:
        return 0
    shapes = infer_shapes(weightless_copy(model))
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        shape = shapes.get(node.input[0])
        axes = _axes(node, initializers)
        if shape is None or len(shape) != 4 or axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        if keepdims == 1:
            node.CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        else:
            # x.mean([2, 3]) -> [N, C]: pool to [N, C, 1, 1], then flatten.
            pooled = f"{node.output[0]}_pooled"
            nodes[-1] = helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name)
            nodes.append(helper.make_node("Flatten", [pooled], list(node.output), name=f"{node.name}_flatten", axis=1))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten
