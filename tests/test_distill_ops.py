"""TorchGraph's op registry against onnxruntime, one tiny single-op model per case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from onnxshrink.distill import TorchGraph, UnsupportedOpError, supported_ops
from onnxshrink.testing import run_ort

RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def rand(*shape: int, low: float | None = None) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(x) + low if low is not None else x


def i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


@dataclass
class Case:
    """One node: ``inputs`` are graph inputs, ``consts`` initializers, in ``order``."""

    id: str
    op: str
    inputs: dict[str, np.ndarray]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    order: list[str] | None = None  # node input names; "" for an omitted optional input
    outputs: list[int] = field(default_factory=lambda: [F32])

    def model(self) -> onnx.ModelProto:
        order = self.order if self.order is not None else [*self.inputs, *self.consts]
        outs = [f"y{i}" for i in range(len(self.outputs))]
        node = helper.make_node(self.op, order, outs, name=f"the_{self.op}", **self.attrs)
        graph = helper.make_graph(
            [node],
            self.id,
            [
                helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for k, v in self.inputs.items()
            ],
            [helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, self.outputs)],
            [numpy_helper.from_array(v, k) for k, v in self.consts.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10 if self.opset >= 21 else 8
        return model


CASES = [
    # convolutions and matrix products
    Case(
        "conv_group_dilation",
        "Conv",
        {"x": rand(2, 4, 9, 9)},
        {"w": rand(6, 2, 3, 3), "b": rand(6)},
        {"group": 2, "dilations": [2, 2], "strides": [2, 1], "pads": [1, 0, 2, 1]},
    ),
    Case(
        "conv_same_upper",
        "Conv",
        {"x": rand(1, 3, 8, 7)},
        {"w": rand(4, 3, 3, 2)},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    ),
    Case(
        "conv_same_lower",
        "Conv",
        {"x": rand(1, 3, 8, 7)},
        {"w": rand(4, 3, 4, 4)},
        {"auto_pad": "SAME_LOWER"},
    ),
    Case("conv_valid_1d", "Conv", {"x": rand(2, 3, 10)}, {"w": rand(5, 3, 3)}, {"auto_pad": "VALID"}),
    Case(
        "conv_depthwise",
        "Conv",
        {"x": rand(1, 8, 6, 6)},
        {"w": rand(8, 1, 3, 3), "b": rand(8)},
        {"group": 8, "pads": [1, 1, 1, 1]},
    ),
    Case(
        "conv_transpose",
        "ConvTranspose",
        {"x": rand(1, 4, 5, 5)},
        {"w": rand(4, 3, 3, 3), "b": rand(3)},
        {"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0]},
    ),
    Case(
        "conv_transpose_group_shape",
        "ConvTranspose",
        {"x": rand(1, 4, 5, 5)},
        {"w": rand(4, 1, 4, 4)},
        {"strides": [2, 2], "group": 2, "output_shape": [10, 10]},
    ),
    Case(
        "gemm_trans_alpha_beta",
        "Gemm",
        {"a": rand(5, 3)},
        {"b": rand(4, 5), "c": rand(4)},
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0},
    ),
    Case("matmul_batched", "MatMul", {"a": rand(2, 3, 4, 5)}, {"b": rand(5, 6)}),
    # normalisation
    Case(
        "batchnorm",
        "BatchNormalization",
        {"x": rand(2, 3, 4, 4)},
        {"s": rand(3), "bias": rand(3), "mean": rand(3), "var": rand(3, low=0.5)},
        {"epsilon": 1e-3},
    ),
    Case(
        "layernorm", "LayerNormalization", {"x": rand(2, 5, 8)}, {"s": rand(8), "bias": rand(8)}, {"axis": -1}
    ),
    Case("layernorm_axis1", "LayerNormalization", {"x": rand(2, 3, 4)}, {"s": rand(3, 4)}, {"axis": 1}),
    Case("instancenorm", "InstanceNormalization", {"x": rand(2, 3, 5, 5)}, {"s": rand(3), "bias": rand(3)}),
    # activations
    *[
        Case(op.lower(), op, {"x": rand(3, 7)})
        for op in ("Relu", "Sigmoid", "HardSwish", "Tanh", "Erf", "Softplus", "Selu")
    ],
    Case("hardsigmoid", "HardSigmoid", {"x": rand(3, 7)}, attrs={"alpha": 0.3, "beta": 0.4}),
    Case("leakyrelu", "LeakyRelu", {"x": rand(3, 7)}, attrs={"alpha": 0.2}),
    Case("elu", "Elu", {"x": rand(3, 7)}, attrs={"alpha": 0.7}),
    Case("prelu", "PRelu", {"x": rand(2, 3, 4)}, {"slope": rand(3, 1)}),
    Case("gelu", "Gelu", {"x": rand(3, 7)}, opset=20),
    Case("gelu_tanh", "Gelu", {"x": rand(3, 7)}, attrs={"approximate": "tanh"}, opset=20),
    Case("softmax13", "Softmax", {"x": rand(2, 3, 4)}, attrs={"axis": 1}),
    Case("softmax11_coerced", "Softmax", {"x": rand(2, 3, 4)}, attrs={"axis": 1}, opset=11),
    Case("logsoftmax", "LogSoftmax", {"x": rand(2, 5)}),
    Case("clip_inputs", "Clip", {"x": rand(4, 5)}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    Case("clip_min_only", "Clip", {"x": rand(4, 5)}, {"lo": np.float32(0.1)}),
    Case("clip_attrs", "Clip", {"x": rand(4, 5)}, attrs={"min": -0.2, "max": 0.3}, opset=6),
    Case("dropout", "Dropout", {"x": rand(3, 4)}),
    # elementwise with broadcasting
    *[
        Case(op.lower(), op, {"a": rand(2, 3, 4), "b": rand(3, 1)})
        for op in ("Add", "Sub", "Mul", "Div", "Max", "Min")
    ],
    Case("pow", "Pow", {"a": rand(2, 3, low=0.1)}, {"b": np.float32(1.7)}),
    Case("div_int", "Div", {"a": i64(7, -7, 9, 100)}, {"b": i64(2, 2, -4, 7)}, outputs=[I64]),
    *[
        Case(op.lower(), op, {"x": rand(3, 4, low=0.1)})
        for op in ("Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal")
    ],
    Case("where_equal", "Where", {"c": np.asarray([[True, False, True]]), "a": rand(2, 3)}, {"b": rand(3)}),
    Case("equal", "Equal", {"a": i64(1, 2, 3)}, {"b": i64(1, 0, 3)}, outputs=[TensorProto.BOOL]),
    # pooling
    Case(
        "maxpool_ceil",
        "MaxPool",
        {"x": rand(1, 2, 7, 7)},
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    ),
    Case(
        "maxpool_pads_dil",
        "MaxPool",
        {"x": rand(1, 2, 9, 8)},
        attrs={"kernel_shape": [3, 2], "pads": [1, 0, 2, 1], "dilations": [2, 1], "strides": [1, 2]},
    ),
    Case(
        "maxpool_ceil_pads",
        "MaxPool",
        {"x": rand(1, 2, 6, 6)},
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    ),
    Case(
        "maxpool_ceil_last_window_in_pad",
        "MaxPool",
        {"x": rand(1, 1, 5, 5)},
        attrs={"kernel_shape": [3, 3], "strides": [3, 3], "pads": [0, 0, 2, 2], "ceil_mode": 1},
    ),
    Case(
        "avgpool_ceil_last_window_in_pad",
        "AveragePool",
        {"x": rand(1, 1, 5, 5)},
        attrs={
            "kernel_shape": [3, 3],
            "strides": [3, 3],
            "pads": [0, 0, 2, 2],
            "ceil_mode": 1,
            "count_include_pad": 1,
        },
    ),
    Case(
        "avgpool_include_pad",
        "AveragePool",
        {"x": rand(1, 2, 7, 7)},
        attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    ),
    Case(
        "avgpool_exclude_pad_ceil",
        "AveragePool",
        {"x": rand(1, 2, 8, 8)},
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    ),
    Case(
        "avgpool_include_pad_ceil",
        "AveragePool",
        {"x": rand(1, 2, 8, 8)},
        attrs={
            "kernel_shape": [3, 3],
            "strides": [2, 2],
            "pads": [0, 1, 1, 0],
            "ceil_mode": 1,
            "count_include_pad": 1,
        },
    ),
    Case(
        "avgpool_same_upper",
        "AveragePool",
        {"x": rand(1, 2, 7, 6)},
        attrs={"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    ),
    Case("global_avg", "GlobalAveragePool", {"x": rand(2, 3, 4, 5)}),
    Case("global_max", "GlobalMaxPool", {"x": rand(2, 3, 4, 5)}),
    # reductions
    Case(
        "reducemean_attr",
        "ReduceMean",
        {"x": rand(2, 3, 4)},
        attrs={"axes": [1, -1], "keepdims": 0},
        opset=13,
    ),
    Case("reducemean_input", "ReduceMean", {"x": rand(2, 3, 4)}, {"axes": i64(2)}, opset=18),
    Case("reducesum_input", "ReduceSum", {"x": rand(2, 3, 4)}, {"axes": i64(0, 2)}, opset=13),
    Case("reducesum_all", "ReduceSum", {"x": rand(2, 3, 4)}, attrs={"keepdims": 0}, opset=13),
    Case("reducemax_attr", "ReduceMax", {"x": rand(2, 3, 4)}, attrs={"axes": [1]}, opset=13),
    # shapes and data movement
    Case("concat", "Concat", {"a": rand(2, 3), "b": rand(2, 2)}, attrs={"axis": -1}),
    Case("reshape_zero_minus1", "Reshape", {"x": rand(2, 3, 4)}, {"s": i64(0, -1, 2)}),
    Case("flatten_axis0", "Flatten", {"x": rand(2, 3, 4)}, attrs={"axis": 0}),
    Case("flatten_axis2", "Flatten", {"x": rand(2, 3, 4, 5)}, attrs={"axis": 2}),
    Case("transpose", "Transpose", {"x": rand(2, 3, 4)}, attrs={"perm": [2, 0, 1]}),
    Case("squeeze_input", "Squeeze", {"x": rand(2, 1, 3, 1)}, {"axes": i64(-1)}),
    Case("squeeze_attr", "Squeeze", {"x": rand(2, 1, 3, 1)}, attrs={"axes": [1]}, opset=11),
    Case("unsqueeze_input", "Unsqueeze", {"x": rand(2, 3)}, {"axes": i64(0, -1)}),
    Case("unsqueeze_attr", "Unsqueeze", {"x": rand(2, 3)}, attrs={"axes": [1, 3]}, opset=11),
    Case(
        "slice_steps",
        "Slice",
        {"x": rand(5, 6, 7)},
        {"st": i64(-1, 1), "en": i64(-9223372036854775807, 100), "ax": i64(0, 2), "sp": i64(-2, 3)},
    ),
    Case("slice_default_axes", "Slice", {"x": rand(5, 6)}, {"st": i64(1, -4), "en": i64(4, -1)}),
    Case("split_input", "Split", {"x": rand(6, 4)}, {"sp": i64(2, 4)}, attrs={"axis": 0}, outputs=[F32, F32]),
    Case(
        "split_attr",
        "Split",
        {"x": rand(2, 6)},
        attrs={"axis": 1, "split": [1, 5]},
        opset=11,
        outputs=[F32, F32],
    ),
    Case(
        "split_num_outputs",
        "Split",
        {"x": rand(7, 2)},
        attrs={"num_outputs": 3},
        opset=18,
        outputs=[F32, F32, F32],
    ),
    Case("gather_vector", "Gather", {"x": rand(4, 5)}, {"i": i64(3, -1, 0)}, attrs={"axis": 1}),
    Case("gather_scalar", "Gather", {"x": rand(4, 5)}, {"i": np.int64(-2)}),
    Case(
        "shape_slice", "Shape", {"x": rand(2, 3, 4)}, attrs={"start": 1, "end": -1}, opset=15, outputs=[I64]
    ),
    Case("constant", "Constant", {}, attrs={"value": numpy_helper.from_array(rand(2, 2), "v")}, order=[]),
    Case(
        "constant_of_shape",
        "ConstantOfShape",
        {"s": i64(2, 3)},
        attrs={"value": numpy_helper.from_array(np.asarray([1.5], np.float32))},
    ),
    Case("identity", "Identity", {"x": rand(2, 3)}),
    Case(
        "cast_to_int",
        "Cast",
        {"x": rand(3, 4) * 5},
        attrs={"to": TensorProto.INT32},
        outputs=[TensorProto.INT32],
    ),
    Case(
        "pad_constant",
        "Pad",
        {"x": rand(1, 2, 3, 3)},
        {"p": i64(0, 0, 1, 2, 0, 0, 2, 0), "v": np.float32(0.5)},
    ),
    Case(
        "pad_reflect",
        "Pad",
        {"x": rand(1, 2, 4, 4)},
        {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)},
        attrs={"mode": "reflect"},
    ),
    Case(
        "pad_edge", "Pad", {"x": rand(1, 2, 4, 4)}, {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, attrs={"mode": "edge"}
    ),
    Case(
        "pad_axes",
        "Pad",
        {"x": rand(2, 3, 4)},
        {"p": i64(1, 2, 3, 0), "v": np.float32(-1), "ax": i64(0, -1)},
        opset=18,
    ),
    Case("expand", "Expand", {"x": rand(3, 1)}, {"s": i64(2, 1, 4)}),
    Case("tile", "Tile", {"x": rand(2, 3)}, {"r": i64(2, 3)}),
    Case(
        "range",
        "Range",
        {},
        {"a": np.float32(1), "b": np.float32(4), "d": np.float32(0.5)},
        order=["a", "b", "d"],
    ),
    # Resize
    Case(
        "resize_nearest_half_pixel",
        "Resize",
        {"x": rand(1, 2, 3, 5)},
        {"s": np.asarray([1, 1, 2.0, 1.5], np.float32)},
        order=["x", "", "s"],
    ),
    Case(
        "resize_nearest_asym_floor",
        "Resize",
        {"x": rand(1, 2, 4, 4)},
        {"s": np.asarray([1, 1, 2, 3], np.float32)},
        attrs={"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        order=["x", "", "s"],
    ),
    Case(
        "resize_nearest_sizes_ceil",
        "Resize",
        {"x": rand(1, 2, 5, 5)},
        {"z": i64(1, 2, 3, 8)},
        attrs={"nearest_mode": "round_prefer_ceil", "coordinate_transformation_mode": "align_corners"},
        order=["x", "", "", "z"],
    ),
    Case(
        "resize_linear_half_pixel",
        "Resize",
        {"x": rand(1, 2, 4, 6)},
        {"s": np.asarray([1, 1, 2, 0.5], np.float32)},
        attrs={"mode": "linear"},
        order=["x", "", "s"],
    ),
    Case(
        "resize_linear_align_corners",
        "Resize",
        {"x": rand(1, 2, 4, 5)},
        {"z": i64(1, 2, 7, 9)},
        attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        order=["x", "", "", "z"],
    ),
    Case(
        "resize_linear_pytorch",
        "Resize",
        {"x": rand(1, 1, 3, 3)},
        {"s": np.asarray([1, 1, 2.5, 2.5], np.float32)},
        attrs={"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
        order=["x", "", "s"],
    ),
    # QuantizeLinear / DequantizeLinear on activations
    Case(
        "quantize_per_tensor",
        "QuantizeLinear",
        {"x": rand(2, 3, 4)},
        {"s": np.float32(0.02), "z": np.int8(3)},
        outputs=[TensorProto.INT8],
    ),
    Case(
        "quantize_uint8_per_axis",
        "QuantizeLinear",
        {"x": rand(2, 3, 4)},
        {"s": np.asarray([0.01, 0.02, 0.05], np.float32), "z": np.asarray([120, 128, 130], np.uint8)},
        outputs=[TensorProto.UINT8],
    ),
    Case(
        "dequantize_per_axis",
        "DequantizeLinear",
        {"q": RNG.integers(-128, 127, (2, 3, 4)).astype(np.int8)},
        {"s": np.asarray([0.01, 0.02, 0.05, 0.1], np.float32), "z": np.asarray([0, 1, -2, 3], np.int8)},
        attrs={"axis": 2},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: Case) -> None:
    model = case.model()
    expected = run_ort(model, case.inputs)
    got = TorchGraph(model).predict(case.inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape, f"{case.id}: shape {g.shape} != {e.shape}"
        assert g.dtype == e.dtype, f"{case.id}: dtype {g.dtype} != {e.dtype}"
        if np.issubdtype(e.dtype, np.floating):
            scale = max(float(np.max(np.abs(e))), 1e-6) if e.size else 1.0
            assert float(np.max(np.abs(g - e), initial=0.0)) <= 1e-5 * scale, case.id
        else:
            np.testing.assert_array_equal(g, e)


BOOL = TensorProto.BOOL
FLAGS = {"a": np.asarray([True, False, True, False]), "b": np.asarray([True, True, False, False])}
MINOR_CASES = [
    *[Case(op.lower(), op, {"x": rand(3, 4) * 3}) for op in ("Ceil", "Floor", "Round", "Sign", "Sin", "Cos")],
    Case("not", "Not", {"x": FLAGS["a"]}, outputs=[BOOL]),
    *[Case(op.lower(), op, dict(FLAGS), outputs=[BOOL]) for op in ("And", "Or", "Xor")],
    *[
        Case(op.lower(), op, {"a": rand(3, 4), "b": rand(4)}, outputs=[BOOL])
        for op in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual")
    ],
    Case("mod_int", "Mod", {"a": i64(7, -7, 5), "b": i64(3, 3, -2)}, outputs=[I64]),
    Case("fmod", "Mod", {"a": rand(5), "b": rand(5, low=0.5)}, attrs={"fmod": 1}),
    *[Case(op.lower(), op, {"a": rand(3, 4), "b": rand(4), "c": rand(3, 1)}) for op in ("Sum", "Mean")],
    *[
        Case(op.lower(), op, {"x": rand(3, 4, 5)}, attrs={"axes": [1]}, opset=13)
        for op in ("ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")
    ],
    *[
        Case(op.lower(), op, {"x": rand(3, 4, 5)}, attrs={"axis": 1}, outputs=[I64])
        for op in ("ArgMax", "ArgMin")
    ],
    Case(
        "argmax_last",
        "ArgMax",
        {"x": np.asarray([[1, 3, 3], [2, 2, 0]], np.float32)},
        attrs={"axis": 1, "keepdims": 0, "select_last_index": 1},
        outputs=[I64],
    ),
    Case(
        "gather_elements",
        "GatherElements",
        {"x": rand(3, 4)},
        {"i": i64(0, -1, 2, 1, 3, 0).reshape(3, 2)},
        attrs={"axis": 1},
    ),
    Case("castlike", "CastLike", {"x": rand(2, 3) * 4}, {"like": np.zeros(1, np.int64)}, outputs=[I64]),
    Case("size", "Size", {"x": rand(2, 3, 4)}, outputs=[I64]),
]


@pytest.mark.parametrize("case", MINOR_CASES, ids=[c.id for c in MINOR_CASES])
def test_minor_op_matches_onnxruntime(case: Case) -> None:
    test_op_matches_onnxruntime(case)


def test_every_registered_op_has_a_case() -> None:
    missing = set(supported_ops()) - {c.op for c in CASES + MINOR_CASES}
    assert not missing, f"ops without a parity case: {sorted(missing)}"


def test_unsupported_op_names_node_and_type() -> None:
    node = helper.make_node("Det", ["x"], ["y"], name="determinant")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", F32, [3, 3])],
        [helper.make_tensor_value_info("y", F32, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match=r"Det.*'determinant'"):
        TorchGraph(model)


def test_custom_domain_is_unsupported() -> None:
    node = helper.make_node("FusedConv", ["x"], ["y"], name="fused", domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", F32, [1])],
        [helper.make_tensor_value_info("y", F32, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    with pytest.raises(UnsupportedOpError, match="com.microsoft::FusedConv"):
        TorchGraph(model)


def test_unsupported_attribute_value_is_a_clear_error() -> None:
    case = Case(
        "cubic",
        "Resize",
        {"x": rand(1, 1, 3, 3)},
        {"s": np.asarray([1, 1, 2, 2], np.float32)},
        attrs={"mode": "cubic"},
        order=["x", "", "s"],
    )
    with pytest.raises(UnsupportedOpError, match="the_Resize.*cubic"):
        TorchGraph(case.model()).predict(case.inputs)
