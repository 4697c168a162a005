"""Lossless preparation passes: checked against onnxruntime with tight tolerances."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from conftest import SAMPLES
from onnxshrink.data import RandomDataset, model_input_specs
from onnxshrink.modelio import load_model
from onnxshrink.passes.cleanup import remove_dead_nodes, remove_unused_initializers
from onnxshrink.passes.prepare import prepare
from onnxshrink.passes.rewrite import reduce_mean_to_global_pool
from onnxshrink.testing import conv_net, run_ort


def _reduce_mean_model(keepdims: int, axes: list[int]) -> onnx.ModelProto:
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm", keepdims=keepdims)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(axes, np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_reduce_mean_over_spatial_axes_becomes_global_pool():
    model = _reduce_mean_model(1, [-1, -2])
    x = {"x": np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype(np.float32)}
    before = run_ort(model, x)[0]
    assert reduce_mean_to_global_pool(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"]
    np.testing.assert_allclose(run_ort(model, x)[0], before, rtol=1e-6, atol=1e-6)


def test_reduce_mean_that_drops_spatial_dims_becomes_pool_and_flatten():
    model = _reduce_mean_model(0, [2, 3])  # x.mean([2, 3]) as torchvision's ShuffleNetV2 writes it
    x = {"x": np.random.default_rng(1).standard_normal((2, 4, 5, 6)).astype(np.float32)}
    before = run_ort(model, x)[0]
    assert reduce_mean_to_global_pool(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool", "Flatten"]
    after = run_ort(model, x)[0]
    assert after.shape == before.shape == (2, 4)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_reduce_mean_over_channels_is_kept():
    assert reduce_mean_to_global_pool(_reduce_mean_model(1, [1, 2, 3])) == 0
    assert reduce_mean_to_global_pool(_reduce_mean_model(0, [1, 2])) == 0


def test_prepare_folds_batchnorm_losslessly():
    model, _ = load_model(SAMPLES / "resnet_mini.onnx")
    samples = RandomDataset(model_input_specs(model), count=4, shapes={"input": [2, 1, 28, 28]}).take(4)
    prepared, report = prepare(model, samples[:2])
    ops = [n.op_type for n in prepared.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops
    assert report.nodes_after < report.nodes_before
    for sample in samples:
        ref = run_ort(model, sample.feeds)[0]
        np.testing.assert_allclose(run_ort(prepared, sample.feeds)[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_prepare_from_the_model_file_matches_prepare_from_the_proto(tmp_path, monkeypatch):
    """With ``source``, onnxruntime reads the model file itself (less memory): same result,
    and the fold step is still checked (its error is reported)."""
    from onnxshrink.passes.prepare import prepare_with_reference

    model, _ = load_model(SAMPLES / "resnet_mini.onnx")
    samples = RandomDataset(model_input_specs(model), count=2, shapes={"input": [2, 1, 28, 28]}).take(2)
    from onnxshrink.passes import prepare as prepare_module

    given: list[object] = []
    real = prepare_module.make_session

    def recording(source, **kwargs):  # noqa: ANN001, ANN202
        given.append(source)
        return real(source, **kwargs)

    monkeypatch.setattr(prepare_module, "make_session", recording)
    from_proto, report_proto, ref_proto = prepare_with_reference(model, samples)
    assert not any(isinstance(g, str) and g.endswith("resnet_mini.onnx") for g in given)
    from_file, report_file, ref_file = prepare_with_reference(model, samples, source=SAMPLES / "resnet_mini.onnx")
    assert str(SAMPLES / "resnet_mini.onnx") in given  # onnxruntime read the file itself
    assert [n.op_type for n in from_file.graph.node] == [n.op_type for n in from_proto.graph.node]
    fold = report_file.steps[0]
    assert fold["step"].startswith("fold") and fold["applied"] and fold["max_relative_error"] <= 1e-4
    for a, b in zip(ref_file, ref_proto):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
    for sample in samples:
        np.testing.assert_allclose(run_ort(from_file, sample.feeds)[0], run_ort(from_proto, sample.feeds)[0], rtol=1e-6, atol=1e-6)

    # A source onnxruntime cannot read: the proto is used instead, nothing is lost.
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    again, report_again, _ = prepare_with_reference(model, samples, source=broken)
    assert [n.op_type for n in again.graph.node] == [n.op_type for n in from_proto.graph.node]
    assert report_again.steps[0]["applied"]


def test_loading_says_when_the_loaded_model_differs_from_the_file(tmp_path):
    """Weights listed as graph inputs (overridable in onnxruntime, so never folded) are
    dropped from the inputs at load: the file is then not the model as loaded."""
    model = conv_net()
    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    assert load_model(plain)[1].changed_on_load is False
    weight = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    as_inputs = tmp_path / "weights_as_inputs.onnx"
    onnx.save(model, as_inputs)
    assert load_model(as_inputs)[1].changed_on_load is True


def test_prepare_upgrades_old_opsets():
    model = conv_net(opset=11)
    samples = RandomDataset(model_input_specs(model), count=2, shapes={"input": [1, 3, 16, 16]}).take(2)
    prepared, report = prepare(model, samples)
    assert next(o.version for o in prepared.opset_import if o.domain == "") >= 13
    assert report.steps[0]["step"].startswith("opset 11")


def test_dead_nodes_and_unused_initializers_are_removed():
    model = conv_net()
    model.graph.node.append(helper.make_node("Relu", ["r0"], ["unused_out"], name="dead"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "orphan"))
    assert remove_dead_nodes(model.graph) == 1
    assert remove_unused_initializers(model.graph) == 1
    onnx.checker.check_model(model)
