"""What a model is: signature, op histogram, parameters, sizes and MACs.

MACs (multiply-accumulates) are counted for the ops that do the arithmetic of a CNN —
Conv, ConvTranspose, Gemm, MatMul and their quantized forms — from shapes inferred with
onnx's shape inference for the given input shapes. FLOPs are reported as 2 x MACs, the
usual convention (bias adds, activations and pooling are not counted).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper
from google.protobuf.message import Message

from onnxshrink.errors import ConfigError
from onnxshrink.modelio import ModelInfo, expected_nbytes, is_repeated, iter_graphs, iter_tensors

log = logging.getLogger(__name__)

Dim = int | str | None
Shape = list[Dim]

#: Version of the JSON layout printed by ``onnxshrink inspect --json``.
INSPECT_SCHEMA = "onnxshrink.inspect/1"

_CONV_LIKE = {"Conv", "ConvInteger", "QLinearConv"}
_MATMUL_LIKE = {"MatMul", "MatMulInteger", "QLinearMatMul"}
_GEMM_LIKE = {"Gemm", "QGemm"}
# Integer initializers are shape/index constants, not learned parameters.
_NON_PARAM_TYPES = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL, TensorProto.STRING}


@dataclass
class TensorSignature:
    name: str
    dtype: str
    shape: Shape | None  # None: rank unknown

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}


@dataclass
class MacCount:
    total: int | None
    by_op_type: dict[str, int] = field(default_factory=dict)
    by_node: dict[str, int] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)  # nodes whose shapes were unknown


@dataclass
class ModelSummary:
    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    producer_version: str
    graph_name: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    node_count: int
    op_types: dict[str, int]
    parameters: int
    weight_bytes: int
    file_bytes: int
    external_data_bytes: int
    macs: MacCount

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": INSPECT_SCHEMA,
            "path": self.path,
            "ir_version": self.ir_version,
            "opsets": self.opsets,
            "producer": {"name": self.producer, "version": self.producer_version},
            "graph_name": self.graph_name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "nodes": self.node_count,
            "op_types": self.op_types,
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "size": {
                "model_file_bytes": self.file_bytes,
                "external_data_bytes": self.external_data_bytes,
                "total_bytes": self.file_bytes + self.external_data_bytes,
            },
            "macs": {
                "total": self.macs.total,
                "flops": None if self.macs.total is None else 2 * self.macs.total,
                "by_op_type": self.macs.by_op_type,
                "input_shapes": self.macs.input_shapes,
                "unresolved_nodes": self.macs.unresolved,
            },
        }


def dtype_name(elem_type: int) -> str:
    try:
        return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    except Exception:  # noqa: BLE001
        return f"type{elem_type}"


def value_signature(value: onnx.ValueInfoProto) -> TensorSignature:
    ttype = value.type.tensor_type
    shape: Shape | None = None
    if ttype.HasField("shape"):
        shape = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return TensorSignature(value.name, dtype_name(ttype.elem_type), shape)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller must feed (initializers listed as inputs are excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_shape_overrides(specs: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """Parse ``name=1x3x224x224`` strings (``--shape``) into a dict."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not dims:
            raise ConfigError(f"--shape '{spec}': expected NAME=D1xD2x..., e.g. input=1x3x224x224")
        try:
            parsed = [int(d) for d in dims.lower().replace(",", "x").split("x")]
        except ValueError:
            raise ConfigError(f"--shape '{spec}': dimensions must be integers") from None
        if any(d <= 0 for d in parsed):
            raise ConfigError(f"--shape '{spec}': dimensions must be positive")
        shapes[name] = parsed
    return shapes


def concrete_input_shapes(model: onnx.ModelProto, overrides: dict[str, list[int]]) -> tuple[dict[str, list[int]], list[str]]:
    """Fix every input's shape: overrides first, a symbolic leading (batch) dim becomes 1.

    Returns the shapes and the names of inputs that stay unresolved.
    """
    unknown_names = set(overrides) - {i.name for i in graph_inputs(model)}
    if unknown_names:
        valid = ", ".join(i.name for i in graph_inputs(model))
        raise ConfigError(f"--shape names unknown input(s) {sorted(unknown_names)}; inputs are: {valid}")
    shapes: dict[str, list[int]] = {}
    unresolved: list[str] = []
    for value in graph_inputs(model):
        sig = value_signature(value)
        if value.name in overrides:
            given = overrides[value.name]
            if sig.shape is not None and len(sig.shape) != len(given):
                raise ConfigError(f"--shape {value.name}: rank {len(given)} given, model expects rank {len(sig.shape)}")
            if sig.shape is not None:
                for want, got in zip(sig.shape, given):
                    if isinstance(want, int) and want != got:
                        raise ConfigError(f"--shape {value.name}: {given} conflicts with the model's fixed shape {sig.shape}")
            shapes[value.name] = given
            continue
        if sig.shape is None:
            unresolved.append(value.name)
            continue
        dims = [d if isinstance(d, int) else (1 if i == 0 else None) for i, d in enumerate(sig.shape)]
        if any(d is None for d in dims):
            unresolved.append(value.name)
            continue
        shapes[value.name] = [int(d) for d in dims if d is not None]
    return shapes, unresolved


#: Initializers with more elements than this are copied without their values for shape
#: inference (their dims are all it needs; shape constants are small and keep theirs).
_SKELETON_MAX_ELEMENTS = 1024


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers keep name, type and dims but no data.

    Built field by field: touching ``raw_data`` of the originals would copy every weight
    (protobuf hands out bytes copies), doubling memory on a large model for a moment.
    """
    skeleton = onnx.ModelProto()
    _copy_fields_except(skeleton, model, "graph")
    _copy_fields_except(skeleton.graph, model.graph, "initializer")
    for tensor in model.graph.initializer:
        if math.prod(tensor.dims) > _SKELETON_MAX_ELEMENTS:
            stub = skeleton.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            skeleton.graph.initializer.add().CopyFrom(tensor)
    return skeleton


def _copy_fields_except(target: Message, source: Message, skipped: str) -> None:
    """Copy every set field of ``source`` into ``target`` but the one named ``skipped``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skipped:
            continue
        if is_repeated(descriptor):
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def with_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weightless copy of the graph whose inputs have the given fixed shapes."""
    skeleton = weightless_copy(model)
    for value in skeleton.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = d
    del skeleton.graph.value_info[:]
    return skeleton


def infer_shapes(model: onnx.ModelProto, *, symbolic: bool = False, merge_dims: bool = True) -> dict[str, Shape]:
    """Shapes of every value that shape inference can work out (best effort).

    onnx's inference (with data propagation) is fast but stops at shapes computed at run
    time, e.g. the ``Shape -> Div -> Reshape`` of a channel shuffle; ``symbolic=True`` uses
    onnxruntime's symbolic shape inference, which evaluates such shape arithmetic.
    ``merge_dims=False`` keeps it from guessing (e.g. that a symbolic dim broadcast against
    a number equals that number): for rewrites that must be exact.
    """
    try:
        if symbolic:
            inferred = _symbolic_infer(model, auto_merge=merge_dims)
        else:
            from onnxshrink.runtime import bounded_memory

            with bounded_memory():
                inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; report, don't fail
        log.info("shape inference failed: %s", str(exc).splitlines()[0] if str(exc) else exc)
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        sig = value_signature(value)
        if sig.shape is not None:
            shapes[value.name] = sig.shape
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def shapes_for_folding(model: onnx.ModelProto) -> dict[str, Shape] | None:
    """The symbolic shapes :func:`onnxshrink.quantize.rewrites.fold_static_shape_reads`
    starts from (dynamic dims kept symbolic, none merged); None if the model reads no shapes.
    JSON-able: it can run in a forked child (:class:`onnxshrink.runtime.ForkedJob`)."""
    if not any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        return None
    return infer_shapes(weightless_copy(model), symbolic=True, merge_dims=False)


def _symbolic_infer(model: onnx.ModelProto, *, auto_merge: bool = True) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference, keeping what it could infer.

    Its own ``infer_shapes`` entry point, when some shape stays unknown, saves the model as
    ``sym_shape_infer_temp.onnx`` (plus data files) in the current directory and raises: a
    tool run in a user's folder must not litter it, and the partial result is still useful.
    """
    inference = _symbolic_shape_inference()(2**31 - 1, auto_merge, False, 0)
    inference._preprocess(model)
    # It repeats its pass while it keeps merging dims; some malformed graphs never settle.
    for _ in range(_SYMBOLIC_MAX_PASSES):
        if not inference.run_:
            break
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


_SYMBOLIC_MAX_PASSES = 8


def _symbolic_shape_inference() -> Any:
    """onnxruntime's SymbolicShapeInference, loaded without ``onnxruntime.tools.__init__``.

    That package imports torch whenever torch is installed (half a gigabyte of memory and
    seconds of start-up for nothing); the module itself needs only onnx, numpy and sympy.
    """
    import importlib.util
    import sys

    name = "onnxshrink._vendor_symbolic_shape_infer"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("onnxruntime")
        assert spec is not None and spec.submodule_search_locations
        path = f"{list(spec.submodule_search_locations)[0]}/tools/symbolic_shape_infer.py"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        # Its warnings ("unsupported broadcast ...") are about its own guesses, not the user's model.
        logging.getLogger(name).setLevel(logging.ERROR)
    return module.SymbolicShapeInference


def _known(shape: Shape | None) -> list[int] | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]  # type: ignore[arg-type]


def node_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    """MACs of one node, 0 for ops that we don't count, None if shapes are unknown."""
    op = node.op_type
    if op in _CONV_LIKE:
        w_index = 3 if op == "QLinearConv" else 1
        out = _known(shapes.get(node.output[0]))
        w = _known(shapes.get(node.input[w_index]))
        if out is None or w is None:
            return None
        # out: N x Cout x spatial; w: Cout x Cin/groups x kernel
        return math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose":
        x = _known(shapes.get(node.input[0]))
        w = _known(shapes.get(node.input[1]))
        if x is None or w is None:
            return None
        # x: N x Cin x spatial; w: Cin x Cout/groups x kernel
        return math.prod(x) * math.prod(w[1:])
    if op in _MATMUL_LIKE or op in _GEMM_LIKE:
        a_index = 0
        a = _known(shapes.get(node.input[a_index]))
        out = _known(shapes.get(node.output[0]))
        if a is None or out is None or not a:
            return None
        if op in _GEMM_LIKE:
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
        else:
            k = a[-1]
        return math.prod(out) * k
    return 0


def count_macs(model: onnx.ModelProto, overrides: dict[str, list[int]] | None = None, *, symbolic: bool = True) -> MacCount:
    """MACs of the model's top-level graph for concrete input shapes.

    ``symbolic=False``: onnx's inference only, never onnxruntime's symbolic inference (which
    imports sympy and can take half a second): shapes computed at run time stay unknown.
    """
    shapes_in, unresolved_inputs = concrete_input_shapes(model, overrides or {})
    if unresolved_inputs:
        log.info("inputs with unknown dimensions: %s (use --shape)", unresolved_inputs)
    fixed = with_input_shapes(model, shapes_in)
    shapes = infer_shapes(fixed)
    if symbolic and not unresolved_inputs and any(node_macs(n, shapes) is None for n in model.graph.node):
        shapes = infer_shapes(fixed, symbolic=True)
    by_type: Counter[str] = Counter()
    by_node: dict[str, int] = {}
    unresolved: list[str] = []
    for i, node in enumerate(model.graph.node):
        macs = node_macs(node, shapes)
        name = node.name or f"{node.op_type}_{i}"
        if macs is None:
            unresolved.append(name)
        elif macs:
            by_type[node.op_type] += macs
            by_node[name] = macs
    total = None if unresolved or unresolved_inputs else sum(by_type.values())
    return MacCount(total, dict(by_type.most_common()), by_node, shapes_in, unresolved)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every non-integer tensor stored in the model (integer tensors are shape
    and index constants, not learned parameters)."""
    return sum(math.prod(t.dims) for t, _ in iter_tensors(model) if t.data_type not in _NON_PARAM_TYPES)


def summarize(model: onnx.ModelProto, info: ModelInfo, *, shapes: dict[str, list[int]] | None = None) -> ModelSummary:
    """Describe a model loaded by :func:`onnxshrink.modelio.load_model`."""
    op_types: Counter[str] = Counter()
    node_count = 0
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            op_types[key] += 1
            node_count += 1
    parameters = count_parameters(model)
    weight_bytes = sum(expected_nbytes(tensor) or 0 for tensor, _ in iter_tensors(model))
    return ModelSummary(
        path=str(info.path),
        ir_version=model.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        producer=model.producer_name,
        producer_version=model.producer_version,
        graph_name=model.graph.name,
        inputs=[value_signature(v) for v in graph_inputs(model)],
        outputs=[value_signature(v) for v in model.graph.output],
        node_count=node_count,
        op_types=dict(op_types.most_common()),
        parameters=parameters,
        weight_bytes=weight_bytes,
        file_bytes=info.file_bytes,
        external_data_bytes=info.external_bytes,
        macs=count_macs(model, shapes),
    )
