"""Bugs in passes/ that the onnx test corpus (tests/test_onnx_corpus.py) and the fuzzer (fuzz/) found."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.data import Sample
from onnxshrink.errors import ShrinkError, UnsupportedModelError
from onnxshrink.passes.cleanup import topological_sort
from onnxshrink.passes.prepare import max_relative_error, prepare
from onnxshrink.testing import conv_net, run_ort


def _one(a: object) -> list[list[np.ndarray]]:
    return [[np.asarray(a)]]


def test_guard_sees_a_nan_or_infinity_the_reference_does_not_have():
    # It used to take max(0, nan) == 0: a step that turned outputs into NaN passed as lossless.
    assert max_relative_error(_one([1.0, 2.0]), _one([1.0, np.nan])) == np.inf
    assert max_relative_error(_one([1.0, 2.0]), _one([1.0, np.inf])) == np.inf
    assert max_relative_error(_one([-np.inf, 2.0]), _one([np.inf, 2.0])) == np.inf


def test_guard_accepts_non_finite_values_the_reference_has():
    assert max_relative_error(_one([np.inf, -np.inf, np.nan, 2.0]), _one([np.inf, -np.inf, np.nan, 2.0])) == 0.0
    # The scale is the largest *finite* reference value, not inf (which made every error 0).
    assert max_relative_error(_one([np.inf, 2.0]), _one([np.inf, 2.5])) == pytest.approx(0.25)


def test_guard_compares_strings_and_sequences():
    words = np.array(["a", "b"], dtype=object)
    assert max_relative_error(_one(words), _one(words.copy())) == 0.0
    assert max_relative_error(_one(words), _one(np.array(["a", "c"], dtype=object))) == np.inf
    seq = [[[np.ones(2), np.zeros(3)]]]
    assert max_relative_error(seq, [[[np.ones(2), np.zeros(3)]]]) == 0.0
    assert max_relative_error(seq, [[[np.ones(2)]]]) == np.inf


def _masked_attention_scores() -> onnx.ModelProto:
    """``Softmax(Where(mask, x @ W, -inf))``: the -inf is a mask fill value, not a weight."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["s"], name="mm"),
        helper.make_node("Where", ["mask", "s", "neg_inf"], ["masked"], name="where"),
        helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
            numpy_helper.from_array(np.array(-np.inf, np.float32), "neg_inf"),
        ],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_minus_inf_mask_constant_is_not_refused_as_a_weight():
    model = _masked_attention_scores()
    feeds = {"x": np.ones((2, 4), np.float32), "mask": np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)}
    prepared, _ = prepare(model, [Sample(feeds)])
    np.testing.assert_allclose(run_ort(prepared, feeds)[0], run_ort(model, feeds)[0], rtol=1e-6)


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_non_finite_weights_are_still_refused(value):
    model = conv_net()
    weight = model.graph.initializer[0]
    w = numpy_helper.to_array(weight).copy()
    w.flat[3] = value
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    with pytest.raises(UnsupportedModelError, match="NaN or infinite"):
        prepare(model, [])
    masked = _masked_attention_scores()
    masked.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((4, 4), value, np.float32), "W"))
    with pytest.raises(UnsupportedModelError, match="initializer 'W' contains 16"):
        prepare(masked, [])


def test_a_graph_that_cannot_be_ordered_is_a_one_line_shrink_error():
    # Found by the fuzzer: onnxruntime's quantizer rewires a model whose input is also an
    # output into a graph that reads an undefined tensor; sorting it raised a bare ValueError.
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])]
    graph = helper.make_graph(nodes, "cycle", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    with pytest.raises(ShrinkError, match=r"cycle or undefined inputs: \['a', 'b'\]") as caught:
        topological_sort(graph)
    assert isinstance(caught.value, ValueError)  # the documented contract still holds

