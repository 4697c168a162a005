"""Read-only lookups over a model's top-level graph, shared by the pruning passes.

Constants are found wherever exporters put them: initializers, ``Constant`` nodes, and
``Identity`` nodes that re-publish an initializer under another name (the TorchScript
exporter does this when it deduplicates equal tensors, e.g. the zero biases of
BatchNorm-folded convolutions). A value counts as constant only when no node can change it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxshrink.modelio import iter_graphs
from onnxshrink.stats import Shape, concrete_input_shapes, count_parameters, infer_shapes, with_input_shapes  # noqa: F401 - re-exported

#: Integer/bool initializers are shape and index constants, not learned parameters.
NON_PARAM_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL, TensorProto.STRING}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def require_weights(model: onnx.ModelProto) -> None:
    """Refuse a model whose weights were not loaded (``load_model(load_weights=False)``)."""
    from onnxshrink.errors import UnsupportedModelError
    from onnxshrink.modelio import has_external_data

    if has_external_data(model):
        raise UnsupportedModelError(
            "the model's weights are still in external data; load them first (load_model(path) with load_weights=True)"
        )


def node_key(node: onnx.NodeProto, index: int) -> str:
    """The name :func:`onnxshrink.stats.count_macs` reports a node under."""
    return node.name or f"{node.op_type}_{index}"


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Producers, consumers, constants and (optionally) inferred shapes of ``model.graph``.

    The index is built once and must not outlive a change to the graph.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        input_shapes: dict[str, list[int]] | None = None,
        with_shapes: bool = True,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(model.graph.node)
        self.opset = default_opset(model)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for j, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, j))
        self.graph_inputs = {v.name for v in model.graph.input}
        self.graph_outputs = {v.name for v in model.graph.output}
        # Names read inside If/Loop/Scan bodies (outer-scope references included).
        self.subgraph_reads: set[str] = set()
        for sub in list(iter_graphs(model.graph))[1:]:
            for node in sub.node:
                self.subgraph_reads.update(n for n in node.input if n)
            self.subgraph_reads.update(o.name for o in sub.output)
        self._const_cache: dict[str, np.ndarray | None] = {}
        self.shapes: dict[str, Shape] = {}
        if with_shapes:
            fixed, _ = concrete_input_shapes(model, input_shapes or {})
            self.shapes = infer_shapes(with_input_shapes(model, fixed))

    # ------------------------------------------------------------------ constants

    def const_source(self, name: str) -> str | None:
        """The initializer or ``Constant`` output that ``name`` is (through Identity chains)."""
        seen = 0
        while name not in self.initializers:
            index = self.producer.get(name)
            if index is None or seen > 64:
                return None
            node = self.nodes[index]
            if node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Constant":
                return name if _constant_tensor(node) is not None else None
            if node.op_type != "Identity":
                return None
            name = node.input[0]
            seen += 1
        if name in self.graph_inputs:  # an initializer a caller may override is no constant
            return None
        return name

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant, else None (cached, read-only)."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        source = self.const_source(name)
        value: np.ndarray | None = None
        if source is not None:
            tensor = self.initializers.get(source)
            if tensor is None:
                tensor = _constant_tensor(self.nodes[self.producer[source]])
            if tensor is not None and tensor.data_location != TensorProto.EXTERNAL:
                value = numpy_helper.to_array(tensor)
                value.flags.writeable = False
        self._const_cache[name] = value
        return value

    def const_uses(self, source: str) -> list[tuple[int, int]]:
        """Every (node, input) that reads the constant ``source``, through Identity chains."""
        uses: list[tuple[int, int]] = []
        stack = [source]
        while stack:
            name = stack.pop()
            for i, j in self.consumers.get(name, []):
                node = self.nodes[i]
                if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                    stack.append(node.output[0])
                else:
                    uses.append((i, j))
        return uses

    def const_escapes(self, source: str) -> bool:
        """True if ``source`` (or an Identity of it) is a graph output or read by a subgraph."""
        stack = [source]
        while stack:
            name = stack.pop()
            if name in self.graph_outputs or name in self.subgraph_reads:
                return True
            for i, _ in self.consumers.get(name, []):
                node = self.nodes[i]
                if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                    stack.append(node.output[0])
        return False

    # ------------------------------------------------------------------ shapes

    def shape(self, name: str) -> list[int] | None:
        """The fully known static shape of ``name`` (constants included), else None."""
        value = self.const(name)
        if value is not None:
            return list(value.shape)
        shape = self.shapes.get(name)
        if shape is None or any(not isinstance(d, int) for d in shape):
            return None
        return [int(d) for d in shape]  # type: ignore[arg-type]

    def rank(self, name: str) -> int | None:
        value = self.const(name)
        if value is not None:
            return value.ndim
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def key(self, index: int) -> str:
        return node_key(self.nodes[index], index)


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node holds, for the forms weights come in."""
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            tensor: TensorProto = a.t
            return tensor
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(a)
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
    return None
