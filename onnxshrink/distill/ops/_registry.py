"""The op registry: one small function per ONNX op type, looked up by :class:`TorchGraph`.

An op function receives the node (its attributes parsed once, at graph construction) and
its input tensors (``None`` for an omitted optional input), and returns one tensor or a
tuple of tensors in the node's output order::

    @register("Relu")
    def relu(node: NodeInfo, x: Tensor) -> Tensor:
        return F.relu(x)

``weights`` declares which input positions hold *weights*: a float initializer reaching one
of them becomes a trainable ``nn.Parameter``; every other initializer is a fixed buffer. This
keeps constants such as ``Clip`` bounds, ``Pow`` exponents, quantization scales and
BatchNorm running statistics out of the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import UnsupportedModelError

#: ``weights="nonscalar"``: any float initializer input with more than one element is a weight.
NONSCALAR: Literal["nonscalar"] = "nonscalar"

OpResult = torch.Tensor | tuple[torch.Tensor, ...]
OpFn = Callable[..., OpResult]

TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.uint16,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.uint32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class UnsupportedOpError(UnsupportedModelError):
    """The graph uses an op (or an attribute value) that TorchGraph cannot run."""


@dataclass(frozen=True)
class NodeInfo:
    """A graph node as the op functions see it: attributes parsed to Python values."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    domain: str = ""
    index: int = 0  # position in the original graph's node list

    def get(self, key: str, default: Any = None) -> Any:
        """The attribute ``key``, or ``default`` when the node does not set it."""
        return self.attrs.get(key, default)

    def unsupported(self, what: str) -> UnsupportedOpError:
        """An error naming this node, to raise for an attribute value we do not handle."""
        return UnsupportedOpError(f"node '{self.name}' ({self.op_type}): {what} is not supported")

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, *, opset: int, index: int) -> NodeInfo:
        attrs: dict[str, Any] = {}
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise UnsupportedOpError(
                    f"node '{node.name or index}' ({node.op_type}) has a subgraph; control flow "
                    "(If/Loop/Scan) is not supported"
                )
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, TensorProto):
                value = numpy_helper.to_array(value)
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8") for v in value]
            attrs[attr.name] = value
        return cls(
            name=node.name or f"{node.op_type}_{index}",
            op_type=node.op_type,
            inputs=tuple(node.input),
            outputs=tuple(node.output),
            attrs=attrs,
            opset=opset,
            domain=node.domain,
            index=index,
        )


@dataclass(frozen=True)
class OpDef:
    """A registered op: its function and the input positions that hold weights."""

    op_type: str
    fn: OpFn
    weights: tuple[int, ...] | Literal["nonscalar"] = ()

    def is_weight_slot(self, position: int, numel: int) -> bool:
        if self.weights == NONSCALAR:
            return numel > 1
        return position in self.weights


OPS: dict[str, OpDef] = {}


def register(*op_types: str, weights: Sequence[int] | Literal["nonscalar"] = ()) -> Callable[[OpFn], OpFn]:
    """Register ``fn`` as the implementation of ``op_types`` (default ONNX domain)."""

    def wrap(fn: OpFn) -> OpFn:
        for op_type in op_types:
            if op_type in OPS:
                raise ValueError(f"op '{op_type}' is registered twice")
            OPS[op_type] = OpDef(op_type, fn, weights if weights == NONSCALAR else tuple(weights))
        return fn

    return wrap


def supported_ops() -> list[str]:
    """The op types TorchGraph can run, sorted."""
    return sorted(OPS)


# --------------------------------------------------------------------------- helpers for ops


def ints(t: torch.Tensor | None) -> list[int]:
    """A 1-D integer tensor (shape, axes, pads, ...) as a Python list; ``None`` gives ``[]``."""
    if t is None:
        return []
    return [int(v) for v in t.reshape(-1).tolist()]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def tensor_like(values: Any, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor on ``ref``'s device (shape values, masks, ...)."""
    return torch.as_tensor(values, dtype=dtype, device=ref.device)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor (copied; bfloat16 goes through float32)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))
