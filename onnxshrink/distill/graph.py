"""TorchGraph: an ONNX graph run node by node with torch ops, its weights as parameters.

Construction sorts the nodes topologically, drops those no output depends on, and sorts
every constant (initializers and ``Constant`` nodes) into

* **parameters** (``self.weights``, an ``nn.ParameterDict``): float constants that reach a
  *weight slot* of an op (``Conv`` inputs 1-2, ``Gemm`` B/C, ``BatchNormalization``
  scale/bias, non-scalar ``Add``/``Mul`` operands, ...; see ``register(weights=...)``),
  directly or through ``Identity``/``Transpose``/``QuantizeLinear``/... chains;
* **quantized parameters**: integer weights behind a ``DequantizeLinear``, trained as floats
  (:mod:`onnxshrink.distill.qdq`);
* **buffers** (``self.constants``): everything else (shapes, BatchNorm running statistics,
  quantization scales, ``Clip`` bounds), never trained.

ONNX names hold dots and slashes, which torch does not allow in parameter names: keys are
sanitised (``conv1.weight`` -> ``w_conv1_weight``) and :attr:`TorchGraph.onnx_names` maps
them back. An initializer that several nodes share stays one (tied) parameter.

Pruned weights stay pruned: a weight of rank >= 2 holding exact zeros gets a 0/1 mask that is
applied **in the forward pass** (``w * mask``, a reparametrisation like
``torch.nn.utils.prune``). Masked entries therefore get zero gradients and are exported as
exact zeros whatever the optimizer does (momentum, weight decay, L1/L2 terms included).

The graph always has inference semantics (BatchNorm uses running statistics, Dropout is the
identity), in ``train()`` and ``eval()`` mode alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from onnxshrink.distill.ops import OPS, NodeInfo, UnsupportedOpError
from onnxshrink.distill.ops._registry import FLOAT_TYPES, TORCH_DTYPES, OpResult, to_torch
from onnxshrink.distill.ops.shape import constant_value
from onnxshrink.distill.qdq import QuantizedWeight, choose_policy, is_quantized_weight
from onnxshrink.errors import DataError, ShrinkError, UnsupportedModelError
from onnxshrink.modelio import has_external_data

log = logging.getLogger(__name__)

#: Ops a weight may pass through (as input 0) on its way to the op that uses it.
PASS_THROUGH = {
    "Identity",
    "Cast",
    "Transpose",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "QuantizeLinear",
    "DequantizeLinear",
}
#: A quantized weight is only treated as pruned above this share of zeros: rounding alone
#: zeroes about 1% of a dense weight's int8 values.
QUANTIZED_PRUNED_FRACTION = 0.2

Feed = Tensor | np.ndarray


class GraphExecutionError(ShrinkError):
    """A node failed while running (shapes that do not fit, a bad value)."""


@dataclass(frozen=True)
class _Step:
    node: NodeInfo
    run: Callable[[dict[str, Tensor]], OpResult]
    frees: tuple[str, ...]  # values no later step reads


class _TensorDict(nn.Module):
    """Named buffers (``nn`` has ParameterDict but no BufferDict)."""

    def add(self, key: str, tensor: Tensor) -> None:
        self.register_buffer(key, tensor)

    def get(self, key: str) -> Tensor:
        return self._buffers[key]  # type: ignore[return-value]


def _sanitize(name: str, prefix: str, taken: set[str]) -> str:
    key = prefix + re.sub(r"[^0-9A-Za-z_]", "_", name)
    unique, k = key, 1
    while unique in taken:
        k += 1
        unique = f"{key}_{k}"
    taken.add(unique)
    return unique


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset")


def _sorted_nodes(graph: onnx.GraphProto, opset: int, known: set[str]) -> list[NodeInfo]:
    """Nodes in topological order, keeping only those the graph outputs depend on."""
    nodes = [NodeInfo.from_proto(n, opset=opset, index=i) for i, n in enumerate(graph.node)]
    producer = {out: node for node in nodes for out in node.outputs if out}
    needed: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or node.index in needed:
            continue
        needed.add(node.index)
        stack.extend(i for i in node.inputs if i)
    remaining = [n for n in nodes if n.index in needed]
    ordered: list[NodeInfo] = []
    available = set(known)
    while remaining:
        ready = [n for n in remaining if all(not i or i in available for i in n.inputs)]
        if not ready:
            node = remaining[0]
            missing = next(i for i in node.inputs if i and i not in available)
            raise UnsupportedModelError(
                f"node '{node.name}' reads '{missing}', which nothing produces (or a cycle)"
            )
        for n in ready:
            available.update(o for o in n.outputs if o)
        ordered += ready
        done = {n.index for n in ready}
        remaining = [n for n in remaining if n.index not in done]
    return ordered


class TorchGraph(nn.Module):
    """An ONNX model as a trainable ``torch.nn.Module`` (see the module docstring).

    Args:
        model: the ONNX model (weights loaded; use :func:`onnxshrink.modelio.load_model`).
        frozen: initializer names to keep fixed even where they are weights.
        keep_sparsity: mask the exact zeros of pruned weights so they stay zero.

    Raises:
        UnsupportedOpError: naming every node whose op type is not supported.
        UnsupportedModelError: external data not loaded, sparse initializers, bad graphs.
    """

    def __init__(
        self, model: onnx.ModelProto, *, frozen: Collection[str] = (), keep_sparsity: bool = True
    ) -> None:
        super().__init__()
        if has_external_data(model):
            raise UnsupportedModelError(
                "the model's weights are in external data that is not loaded; "
                "load it with onnxshrink.modelio.load_model"
            )
        graph = model.graph
        if len(graph.sparse_initializer):
            raise UnsupportedModelError("sparse initializers are not supported")
        self.opset = _default_opset(model)
        self._template = model
        self.weights = nn.ParameterDict()
        self.constants = _TensorDict()
        self.masks = _TensorDict()
        self.onnx_names: dict[str, str] = {}  # parameter key -> ONNX name
        self._keys: dict[str, str] = {}  # ONNX name -> parameter or buffer key
        self.quantized: dict[str, QuantizedWeight] = {}
        self._constant_nodes: set[str] = set()

        arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        elem_types = {t.name: t.data_type for t in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in arrays]
        self.output_names = [o.name for o in graph.output]
        self._output_types = {o.name: TORCH_DTYPES.get(o.type.tensor_type.elem_type) for o in graph.output}
        nodes = _sorted_nodes(graph, self.opset, set(arrays) | set(self.input_names) | {""})
        self._check_supported(nodes)
        for node in nodes:  # Constant nodes are constants like initializers (and written back alike)
            if node.op_type == "Constant":
                arrays[node.outputs[0]] = constant_value(node)
                elem_types[node.outputs[0]] = onnx.helper.np_dtype_to_tensor_dtype(
                    arrays[node.outputs[0]].dtype
                )
                self._constant_nodes.add(node.outputs[0])
        nodes = [n for n in nodes if n.op_type != "Constant"]

        weight_uses = self._find_weights(nodes, arrays)
        taken: set[str] = set()
        for name, array in arrays.items():
            if name in weight_uses and name not in frozen and elem_types[name] in FLOAT_TYPES:
                self._add_parameter(name, array, taken, keep_sparsity, pruned_fraction=0.0)
        self._add_quantized(nodes, arrays, weight_uses, frozen, taken, keep_sparsity)
        for name, array in arrays.items():
            if name not in self._keys:
                self._add_buffer(name, array, taken)
        self._plan = self._build_plan(nodes)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _check_supported(nodes: list[NodeInfo]) -> None:
        bad = [n for n in nodes if n.op_type not in OPS or n.domain not in ("", "ai.onnx")]
        if bad:
            listed = ", ".join(
                f"'{n.name}' ({n.domain + '::' if n.domain else ''}{n.op_type})" for n in bad[:8]
            )
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            kinds = sorted({n.op_type for n in bad})
            raise UnsupportedOpError(
                f"TorchGraph cannot run op type(s) {', '.join(kinds)}: node(s) {listed}{more}; "
                "see onnxshrink.distill.supported_ops()"
            )

    @staticmethod
    def _find_weights(
        nodes: list[NodeInfo], arrays: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[NodeInfo, int, NodeInfo | None]]:
        """Constants reaching a weight slot: name -> (consumer, slot, last pass-through node)."""
        producer = {out: node for node in nodes for out in node.outputs if out}
        found: dict[str, tuple[NodeInfo, int, NodeInfo | None]] = {}
        for node in nodes:
            op = OPS[node.op_type]
            for position, name in enumerate(node.inputs):
                via: NodeInfo | None = None
                while (
                    name
                    and name not in arrays
                    and name in producer
                    and producer[name].op_type in PASS_THROUGH
                ):
                    via = producer[name]
                    name = via.inputs[0]
                if name in arrays and op.is_weight_slot(position, arrays[name].size) and name not in found:
                    found[name] = (node, position, via)
        return found

    def _add_buffer(self, name: str, array: np.ndarray, taken: set[str]) -> None:
        key = _sanitize(name, "c_", taken)
        try:
            self.constants.add(key, to_torch(array))
        except TypeError:
            raise UnsupportedModelError(
                f"constant '{name}' has type {array.dtype}, which torch cannot hold"
            ) from None
        self._keys[name] = key

    def _add_parameter(
        self, name: str, array: np.ndarray, taken: set[str], keep_sparsity: bool, *, pruned_fraction: float
    ) -> None:
        key = _sanitize(name, "w_", taken)
        value = to_torch(array)
        self.weights[key] = nn.Parameter(value)
        self.onnx_names[key] = name
        self._keys[name] = key
        zeros = int((value == 0).sum())
        if keep_sparsity and value.dim() >= 2 and zeros and zeros > pruned_fraction * value.numel():
            self.masks.add(key, (value != 0).to(value.dtype))

    def _add_quantized(
        self,
        nodes: list[NodeInfo],
        arrays: dict[str, np.ndarray],
        weight_uses: Mapping[str, tuple[NodeInfo, int, NodeInfo | None]],
        frozen: Collection[str],
        taken: set[str],
        keep_sparsity: bool,
    ) -> None:
        """Turn integer weights behind a DequantizeLinear into float parameters."""
        readers: dict[str, int] = {}
        for node in nodes:
            for i in node.inputs:
                readers[i] = readers.get(i, 0) + 1
        found: dict[str, tuple[QuantizedWeight, NodeInfo, int]] = {}
        for name, (consumer, position, via) in weight_uses.items():
            if name in frozen or via is None or via.op_type != "DequantizeLinear" or via.inputs[0] != name:
                continue
            scale_name = via.inputs[1]
            zp_name = via.inputs[2] if len(via.inputs) > 2 and via.inputs[2] else None
            if readers.get(name) != 1 or scale_name not in arrays or (zp_name and zp_name not in arrays):
                continue
            scale, zp = arrays[scale_name], arrays[zp_name] if zp_name else None
            if not is_quantized_weight(arrays[name], scale, zp, via):
                continue
            qw = QuantizedWeight(via, name, scale_name, zp_name, scale, zp, arrays[name].dtype)
            found[name] = (qw, consumer, position)
        producer = {out: node for node in nodes for out in node.outputs if out}
        # Weights first: a bias's policy depends on its weight's.
        for name, (qw, consumer, position) in sorted(found.items(), key=lambda item: item[1][2] == 2):
            partner = input_scale = None
            if len(consumer.inputs) > 1:
                w_dq = producer.get(consumer.inputs[1])
                partner = found[w_dq.inputs[0]][0] if w_dq is not None and w_dq.inputs[0] in found else None
                x_dq = producer.get(consumer.inputs[0])
                if x_dq is not None and x_dq.op_type == "DequantizeLinear" and x_dq.inputs[1] in arrays:
                    input_scale = (x_dq.inputs[1], arrays[x_dq.inputs[1]])
            choose_policy(qw, arrays[name], consumer, position, partner, input_scale)
            self._add_parameter(
                name,
                qw.initial_value(arrays[name]),
                taken,
                keep_sparsity,
                pruned_fraction=QUANTIZED_PRUNED_FRACTION,
            )
            self.quantized[name] = qw

    def _build_plan(self, nodes: list[NodeInfo]) -> list[_Step]:
        last_read: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for i in node.inputs:
                if i:
                    last_read[i] = index
        keep = set(self.output_names) | set(self._keys)
        plan = []
        for index, node in enumerate(nodes):
            frees = tuple(i for i in set(node.inputs) if i and last_read.get(i) == index and i not in keep)
            qw = self.quantized.get(node.inputs[0]) if node.op_type == "DequantizeLinear" else None
            run = qw.forward if qw is not None and qw.node is node else _runner(node)
            plan.append(_Step(node, run, frees))
        return plan

    # ------------------------------------------------------------------ running

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def weight(self, name: str) -> Tensor:
        """The value the graph uses for weight ``name`` (an ONNX name): masked if pruned."""
        key = self._keys[name]
        param: Tensor = self.weights[key]
        mask = self.masks._buffers.get(key)
        return param if mask is None else param * mask

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(ONNX name, parameter) for every trainable weight."""
        for key, param in self.weights.items():
            yield self.onnx_names[key], param

    def _constant_values(self) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for name, key in self._keys.items():
            values[name] = self.weight(name) if key in self.weights else self.constants.get(key)
        return values

    def run(self, feeds: Mapping[str, Feed]) -> dict[str, Tensor]:
        """Run the graph on named inputs; return every graph output by name."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise DataError(f"missing model input(s) {missing}; the model takes {self.input_names}")
        device = self.device
        values = self._constant_values()
        for name in self.input_names:
            value = feeds[name]
            values[name] = (
                torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
            ).to(device)
        for step in self._plan:
            try:
                result = step.run(values)
            except ShrinkError:
                raise
            except Exception as exc:
                detail = " ".join(str(exc).split())[:300]
                raise GraphExecutionError(
                    f"node '{step.node.name}' ({step.node.op_type}) failed: {type(exc).__name__}: {detail}"
                ) from exc
            outputs = result if isinstance(result, tuple) else (result,)
            for name, value in zip(step.node.outputs, outputs):
                if name:
                    values[name] = value
            for name in step.frees:
                values.pop(name, None)
        out = {}
        for name in self.output_names:
            value = values[name]
            dtype = self._output_types.get(name)
            out[name] = value.to(dtype) if dtype is not None and value.dtype != dtype else value
        return out

    def forward(self, *inputs: Feed, **named: Feed) -> tuple[Tensor, ...]:
        """Run the graph; inputs by position (graph input order) or by name.

        Returns:
            The graph outputs, in graph output order (always a tuple).
        """
        if len(inputs) > len(self.input_names):
            raise DataError(f"the model takes {len(self.input_names)} input(s), got {len(inputs)}")
        feeds = dict(zip(self.input_names, inputs))
        feeds.update(named)
        results = self.run(feeds)
        return tuple(results[name] for name in self.output_names)

    def predict(self, feeds: Mapping[str, Feed]) -> list[np.ndarray]:
        """Outputs as numpy arrays, without gradients (like an onnxruntime session's run)."""
        with torch.no_grad():
            results = self.run(feeds)
        return [results[name].detach().cpu().numpy() for name in self.output_names]

    def __repr__(self) -> str:
        return (
            f"TorchGraph(nodes={len(self._plan)}, opset={self.opset}, weights={len(self.weights)}, "
            f"quantized={len(self.quantized)}, masked={len(self.masks._buffers)})"
        )

    # ------------------------------------------------------------------ export

    def export(self, model_template: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """A copy of ``model_template`` (default: the model this graph was built from) holding
        the current weights. Weights that did not change are left untouched, bytes included.

        Raises:
            UnsupportedModelError: the template lacks one of the graph's weights.
        """
        template = self._template if model_template is None else model_template
        model = onnx.ModelProto()
        model.CopyFrom(template)
        tensors: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
        trained = set(self.onnx_names.values())
        for node in model.graph.node:
            if (
                node.op_type == "Constant"
                and node.output
                and node.output[0] in trained & self._constant_nodes
            ):
                tensors[node.output[0]] = _constant_tensor(node)
        missing = [name for name in self.onnx_names.values() if name not in tensors]
        if missing:
            raise UnsupportedModelError(
                f"the template model has no weight(s) {missing[:5]}; "
                "export into the model this graph was built from"
            )
        with torch.no_grad():
            values = {k: v.detach() for k, v in self._constant_values().items()}
            unchanged = frozenset(
                name
                for name, qw in self.quantized.items()
                if np.array_equal(
                    values[name].cpu().numpy(), qw.initial_value(numpy_helper.to_array(tensors[name]))
                )
            )
            for name in self.onnx_names.values():
                qw = self.quantized.get(name)
                if qw is not None:
                    if qw.needs_export(unchanged):
                        qw.write(model, values[name], values, unchanged, tensors)
                    continue
                new = values[name].cpu().numpy()
                old = numpy_helper.to_array(tensors[name])
                if not np.array_equal(new.astype(old.dtype), old):
                    tensors[name].CopyFrom(numpy_helper.from_array(new.astype(old.dtype), name))
        return model


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto:
    """The ``value`` tensor of a Constant node, converting scalar/list forms in place."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
    info = NodeInfo.from_proto(node, opset=0, index=0)
    tensor = numpy_helper.from_array(constant_value(info), node.output[0])
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute("value", tensor))
    return node.attribute[0].t


def _runner(node: NodeInfo) -> Callable[[dict[str, Tensor]], OpResult]:
    fn = OPS[node.op_type].fn
    names = node.inputs

    def run(values: dict[str, Tensor]) -> OpResult:
        return fn(node, *[values[n] if n else None for n in names])

    return run
