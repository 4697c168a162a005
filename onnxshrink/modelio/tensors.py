"""What a model holds, walked safely: its graphs and stored tensors, their sizes, the limits
every model file is held to, and where a loaded model came from."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from onnx import TensorProto, helper

from onnxshrink.errors import UnsafeModelError


#: A protobuf message cannot exceed 2 GiB; bigger weights must live in external data.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this total weight size, saved models keep their weights in an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Tensors smaller than this stay inline even when saving with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
#: If/Loop/Scan nesting deeper than this is refused (protects recursive walks).
MAX_GRAPH_DEPTH = 32
#: The lowest default-domain opset we accept; quantization needs per-channel Q/DQ (opset 13)
#: but loading, inspection and pruning work from 11.
MIN_OPSET = 11
MAX_OPSET = onnx.defs.onnx_opset_version()

_SUB_BYTE_TYPES = {
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, name)
}


@dataclass
class ModelInfo:
    """Where a loaded model came from (kept beside the proto; onnx has no slot for it)."""

    path: Path
    file_bytes: int
    external_files: dict[str, int] = field(default_factory=dict)  # location -> size on disk
    #: Whether loading changed the graph (declared -1 dims cleared, Constant nodes lifted,
    #: weights listed as inputs dropped): then the file is not the model as loaded, e.g. for
    #: onnxruntime, weights listed as inputs are overridable, so it folds nothing into them.
    changed_on_load: bool = False

    @property
    def external_bytes(self) -> int:
        return sum(self.external_files.values())


def is_repeated(descriptor: FieldDescriptor) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` from protobuf 6 on, ``label`` before; 7 removed ``label``)."""
    return descriptor.is_repeated if hasattr(descriptor, "is_repeated") else descriptor.label == descriptor.LABEL_REPEATED


def iter_graphs(graph: onnx.GraphProto, *, depth: int = 0, path: Path | None = None) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every subgraph (If/Loop/Scan bodies), refusing absurd nesting."""
    if depth > MAX_GRAPH_DEPTH:
        raise UnsafeModelError(f"subgraphs are nested more than {MAX_GRAPH_DEPTH} deep", path=path)
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, depth=depth + 1, path=path)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g, depth=depth + 1, path=path)


def iter_tensors(model: onnx.ModelProto, *, path: Path | None = None) -> Iterator[tuple[TensorProto, str]]:
    """Yield every stored tensor in the model with a short description of where it is."""

    def from_nodes(nodes: Iterator[onnx.NodeProto] | list[onnx.NodeProto]) -> Iterator[tuple[TensorProto, str]]:
        for node in nodes:
            for attr in node.attribute:
                where = f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t, where
                elif attr.type == onnx.AttributeProto.TENSORS:
                    for t in attr.tensors:
                        yield t, where
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values, where
                    yield attr.sparse_tensor.indices, where
                elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for st in attr.sparse_tensors:
                        yield st.values, where
                        yield st.indices, where

    for graph in iter_graphs(model.graph, path=path):
        for t in graph.initializer:
            yield t, f"initializer '{t.name}'"
        for st in graph.sparse_initializer:
            yield st.values, f"sparse initializer '{st.values.name}'"
            yield st.indices, f"sparse initializer '{st.values.name}' indices"
        yield from from_nodes(graph.node)
    for fn in model.functions:
        yield from from_nodes(fn.node)


def expected_nbytes(tensor: TensorProto) -> int | None:
    """Bytes the tensor's raw data must hold for its declared dims, or None for strings."""
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_type in _SUB_BYTE_TYPES:
        bits = 2 if tensor.data_type in {getattr(TensorProto, n, -1) for n in ("INT2", "UINT2")} else 4
        return (count * bits + 7) // 8
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001 - unknown or undefined type
        raise ValueError(f"unknown tensor data type {tensor.data_type}") from None
    return count * itemsize


def typed_field_count(tensor: TensorProto) -> tuple[int, int]:
    """(number of values stored in typed fields, values the dims need in that field)."""
    count = 1
    for d in tensor.dims:
        count *= d
    dt = tensor.data_type
    if dt in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        count *= 2
    stored = (
        len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data)
        + len(tensor.double_data) + len(tensor.uint64_data) + len(tensor.string_data)
    )
    if dt in _SUB_BYTE_TYPES:
        count = (count + 1) // 2  # two 4-bit values per int32 slot
    return stored, count


def external_location(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t, _ in iter_tensors(model))


def weights_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held in the proto (inline raw or typed fields)."""
    total = 0
    for t, _ in iter_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            total += expected_nbytes(t) or 0
    return total
