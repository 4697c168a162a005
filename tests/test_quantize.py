"""int8 quantization end to end: real sample models, real data, real onnxruntime sessions."""

from __future__ import annotations

import os
import time

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
import pytest

from conftest import SAMPLES
from onnxshrink.data import NpzDataset, RandomDataset, model_input_specs, open_dataset
from onnxshrink.errors import DataError, ShrinkError
from onnxshrink.fusion import analyze_fusion
from onnxshrink.modelio import load_model
from onnxshrink.quantize import Int8Config, quantize_int8
from onnxshrink.runtime import make_session
from onnxshrink.testing import conv_net, fragile_head_net

SAMPLE_MODELS = ["plain_cnn", "resnet_mini", "mobilenet_mini"]


def _accuracy(model: onnx.ModelProto, path) -> float:
    data = np.load(path)
    session = make_session(model, threads=None)
    logits = session.run(None, {"input": data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["labels"]))


@pytest.fixture(scope="module")
def quantized_samples():
    results = {}
    for name in SAMPLE_MODELS:
        model, _ = load_model(SAMPLES / f"{name}.onnx")
        results[name] = (model, quantize_int8(model, open_dataset(SAMPLES / "digits_calib.npz", model)))
    return results


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_models_keep_accuracy(quantized_samples, name):
    model, result = quantized_samples[name]
    fp32 = _accuracy(model, SAMPLES / "digits_eval.npz")
    int8 = _accuracy(result.model, SAMPLES / "digits_eval.npz")
    assert fp32 > 0.95
    assert fp32 - int8 <= 0.005, f"{name}: fp32 {fp32:.4f} int8 {int8:.4f}"
    assert result.target_met
    assert result.fidelity.sqnr_db > 20
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_models_run_in_int8_kernels(quantized_samples, name):
    """The model onnxruntime executes is int8 where the MACs are, with no Q/DQ churn."""
    _, result = quantized_samples[name]
    ops = {n.op_type for n in result.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = analyze_fusion(result.model)
    assert report.int8_mac_fraction is not None and report.int8_mac_fraction > 0.95
    quantizable = set(Int8Config().quantized_op_types)
    assert not [u for u in report.unfused if u.op_type in quantizable], report.unfused
    assert not report.redundant_qdq_pairs
    assert all(n.op_type != "BatchNormalization" for n in result.model.graph.node), "BN must be folded"


def test_fragile_model_falls_back_and_names_the_node(tmp_path):
    model = fragile_head_net()
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    dataset = NpzDataset(tmp_path / "calib.npz", model_input_specs(model))
    naive = quantize_int8(model, dataset, Int8Config(max_drop=100.0))
    assert naive.fidelity.top1_agreement < 0.5, "the test model must really be fragile"
    result = quantize_int8(model, dataset, Int8Config(max_drop=1.0))
    assert result.target_met
    assert result.fidelity.top1_agreement >= 0.99
    kept = {n.node: n.reason for n in result.fp32_nodes}
    assert "head" in kept and kept["head"].startswith("accuracy")
    assert result.sensitivity[0].node == "head"


def test_sqnr_target_for_non_classifiers(tmp_path):
    model = conv_net(classes=1, seed=3)
    dataset = RandomDataset(model_input_specs(model), count=60, shapes={"input": [1, 3, 16, 16]})
    result = quantize_int8(model, dataset, Int8Config(min_sqnr=25.0))
    assert result.target == {"kind": "min_sqnr_db", "value": 25.0, "default": False}
    assert result.fidelity.top1_agreement is None
    assert result.target_met == (result.fidelity.sqnr_db >= 25.0)


def test_non_finite_weights_are_refused():
    model = conv_net()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.inf
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    dataset = RandomDataset(model_input_specs(model), count=8)
    with pytest.raises(ShrinkError, match="initializer .conv0.weight. contains 1 NaN or infinite"):
        quantize_int8(model, dataset)


def test_non_finite_calibration_data_is_refused(tmp_path):
    model = conv_net()
    x = np.zeros((4, 3, 16, 16), np.float32)
    x[2, 0, 0, 0] = np.nan
    np.savez(tmp_path / "bad.npz", input=x)
    with pytest.raises(DataError, match="NaN"):
        quantize_int8(model, NpzDataset(tmp_path / "bad.npz", model_input_specs(model)))


def test_already_quantized_model_is_refused(quantized_samples):
    _, result = quantized_samples["plain_cnn"]
    dataset = open_dataset(SAMPLES / "digits_calib.npz", result.model)
    with pytest.raises(ShrinkError, match="already quantized"):
        quantize_int8(result.model, dataset)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_vectorised_weight_scales_equal_onnxruntimes(reduce_range):
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, get_qmin_qmax_for_qType

    from onnxshrink.quantize.engine import symmetric_per_channel_params

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((7, 3, 3, 3)).astype(np.float32) * rng.uniform(1e-3, 10, (7, 1, 1, 1)).astype(np.float32)
    weight[2] = 0.0  # an all-zero channel gets scale 1
    weight[4] = 1e-40  # subnormal: below float32's smallest normal
    qtype = onnx.TensorProto.INT8
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range, symmetric=True)
    for axis in (0, 1):
        zero_point, scale = symmetric_per_channel_params(weight, axis, qmin, qmax)
        for c in range(weight.shape[axis]):
            zp_ref, scale_ref = compute_data_quant_params(weight.take(c, axis).ravel(), qtype, True, reduce_range=reduce_range)
            assert scale[c] == scale_ref and scale.dtype == scale_ref.dtype
            assert zero_point[c] == zp_ref and zero_point.dtype == zp_ref.dtype


@pytest.mark.parametrize("qtype", [TensorProto.INT8, TensorProto.UINT8])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_vectorised_weight_quantization_equals_onnxruntimes(qtype, axis):
    from onnxruntime.quantization.quant_utils import quantize_onnx_initializer

    from onnxshrink.quantize.engine import quantize_per_channel_initializer

    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((6, 5, 3, 3)) * 4).astype(np.float32)
    weight.flat[::7] = 0.5  # exact halves: rounding ties go to even in both
    tensor = numpy_helper.from_array(weight, "w")
    channels = weight.shape[axis]
    scale = rng.uniform(0.01, 0.05, channels).astype(np.float32)
    np_type = np.int8 if qtype == TensorProto.INT8 else np.uint8
    zero_point = (rng.integers(-3, 4, channels) + (0 if qtype == TensorProto.INT8 else 128)).astype(np_type)
    ours = quantize_per_channel_initializer(tensor, qtype, zero_point, scale, axis)
    theirs = quantize_onnx_initializer(tensor, qtype, zero_point, scale, axis % weight.ndim)
    assert ours is not None and ours.SerializeToString() == theirs.SerializeToString()
    # per-tensor and blocked weights are left to onnxruntime
    assert quantize_per_channel_initializer(tensor, qtype, zero_point[:1], scale[:1], None) is None
    assert quantize_per_channel_initializer(tensor, qtype, zero_point, scale, axis, block_size=32) is None


@pytest.mark.parametrize("huge_bias", [False, True])
def test_qdq_build_matches_onnxruntimes_own_quantizer(monkeypatch, huge_bias):
    """Our vectorised weights, bias-scale screen and shape inference on a weightless copy
    change nothing. ``huge_bias``: a bias too large for input scale x weight scale in int32,
    so that onnxruntime widens that weight's scales (the screen hands it over)."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    from onnxshrink.passes.prepare import prepare
    from onnxshrink.quantize import engine
    from onnxshrink.quantize.calibrate import choose_range, collect_stats

    model, _ = load_model(SAMPLES / "mobilenet_mini.onnx")
    data = open_dataset(SAMPLES / "digits_calib.npz", model)
    prepared, _ = prepare(model, list(data.take(2)))
    engine.ensure_node_names(prepared)
    if huge_bias:
        conv = next(n for n in prepared.graph.node if n.op_type == "Conv" and len(n.input) > 2)
        bias = next(t for t in prepared.graph.initializer if t.name == conv.input[2])
        values = numpy_helper.to_array(bias).copy()
        values[0] = 3e6
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    stats = collect_stats(prepared, iter(data.take(8)), histogram=False).stats
    ranges = {name: choose_range(s, "minmax") for name, s in stats.items()}
    ours = engine.build_qdq(prepared, ranges, Int8Config())
    monkeypatch.setattr(engine, "_quantizer_class", lambda: QDQQuantizer)
    monkeypatch.setattr(engine, "_attach_inferred_types", lambda model: None)
    theirs = engine.build_qdq(prepared, ranges, Int8Config())
    assert [n.SerializeToString() for n in ours.graph.node] == [n.SerializeToString() for n in theirs.graph.node]
    assert {t.name: t.SerializeToString() for t in ours.graph.initializer} == {t.name: t.SerializeToString() for t in theirs.graph.initializer}
    assert not any(p.key == "onnx.infer" for p in ours.metadata_props)
    if huge_bias:  # the widened scale is there: the case was exercised
        qbias = next(n for n in ours.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith(bias.name))
        scale = numpy_helper.to_array(next(t for t in ours.graph.initializer if t.name == qbias.input[1]))
        assert scale[0] >= 2 * 3e6 / 2**32


def test_sensitivity_in_graph_equals_exposed_activations():
    """The one-session SQNR (sums inside onnxruntime) equals comparing exposed activations."""
    from onnxshrink.passes.prepare import prepare
    from onnxshrink.quantize import engine, sensitivity
    from onnxshrink.quantize.calibrate import choose_range, collect_stats

    model, _ = load_model(SAMPLES / "mobilenet_mini.onnx")
    data = open_dataset(SAMPLES / "digits_calib.npz", model)
    prepared, _ = prepare(model, list(data.take(2)))
    engine.ensure_node_names(prepared)
    stats = collect_stats(prepared, iter(data.take(8)), histogram=False).stats
    qdq = engine.build_qdq(prepared, {name: choose_range(s, "minmax") for name, s in stats.items()}, Int8Config())
    probe = list(data.take(6))
    ranked = sensitivity.node_sensitivity(prepared, qdq, probe)
    views = {t: v for t, v in sensitivity._dequantized_views(qdq).items() if t in {o for n in prepared.graph.node for o in n.output}}
    in_graph = sensitivity._sqnr_in_graph(prepared, qdq, views, probe)
    exposed = sensitivity._sqnr_exposed(prepared, qdq, views, probe)
    assert len(ranked) > 10 and set(in_graph) == set(exposed)
    finite = [t for t in exposed if np.isfinite(exposed[t])]
    assert len(finite) > 10
    assert max(abs(in_graph[t] - exposed[t]) for t in finite) < 1e-3


def _dense_block_net(seed: int = 0) -> onnx.ModelProto:
    """DenseNet-style: Conv -> Concat(with its input) -> BatchNorm -> ReLU -> Conv -> pool -> Gemm.

    The BatchNorm follows a Concat, so no convolution can absorb it."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        init("c1.w", rng.normal(0, 0.3, (8, 3, 3, 3))),
        init("bn.scale", rng.uniform(0.5, 1.5, 11)),
        init("bn.bias", rng.normal(0, 0.2, 11)),
        init("bn.mean", rng.normal(0, 0.2, 11)),
        init("bn.var", rng.uniform(0.5, 1.5, 11)),
        init("c2.w", rng.normal(0, 0.3, (16, 11, 3, 3))),
        init("fc.w", rng.normal(0, 0.3, (10, 16))),
        init("fc.b", rng.normal(0, 0.1, 10)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c1.w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["input", "c1"], ["cat"], name="concat", axis=1),
        helper.make_node("BatchNormalization", ["cat", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"], name="norm"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "c2.w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "dense", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_standalone_batchnorm_becomes_an_int8_depthwise_conv():
    from onnxshrink.quantize.rewrites import batchnorm_to_depthwise_conv
    from onnxshrink.runtime import make_session

    model = _dense_block_net()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert batchnorm_to_depthwise_conv(rewritten) == ["norm"]
    x = {"input": np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)}
    before, after = (make_session(m, threads=1).run(None, x)[0] for m in (model, rewritten))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)  # lossless in fp32

    data = RandomDataset(model_input_specs(model), count=60, seed=2)
    result = quantize_int8(model, data)
    step = next(s for s in result.prepare.steps if "depthwise" in s["step"])
    assert step["applied"] and step["nodes"] == 1
    # The BatchNorm no longer runs in float between Q/DQ: every unit is an int8 kernel.
    assert result.fusion.unfused == []
    assert result.fidelity.sqnr_db > 25


def _shuffle_net() -> onnx.ModelProto:
    """A channel shuffle whose reshape targets are computed from Shape(x), batch dynamic."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, np.int64), name)

    inits = [
        const("zero", [0]), const("one", 1), const("two", 2), const("i0", 0), const("i1", 1), const("s2", [2]), const("s4", [4]),
        numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["x"], name="conv"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "i0"], ["n"], name="batch"),
        helper.make_node("Gather", ["shape", "i1"], ["c"], name="channels"),
        helper.make_node("Div", ["c", "two"], ["half"], name="half"),
        helper.make_node("Slice", ["shape", "s2", "s4"], ["hw"], name="hw"),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="n1"),
        helper.make_node("Unsqueeze", ["half", "zero"], ["half1"], name="half1"),
        helper.make_node("Concat", ["n1", "s2", "half1", "hw"], ["target"], name="target", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["grouped"], name="group"),
        helper.make_node("Transpose", ["grouped"], ["swapped"], name="swap", perm=[0, 2, 1, 3, 4]),
        helper.make_node("Shape", ["x"], ["shape2"], name="shape2"),
        helper.make_node("Reshape", ["swapped", "shape2"], ["output"], name="ungroup"),
    ]
    graph = helper.make_graph(
        nodes, "shuffle", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 4, 6, 6])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_static_shape_reads_fold_and_the_batch_stays_dynamic():
    from onnxshrink.quantize.rewrites import fold_static_shape_reads

    model = _shuffle_net()
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_static_shape_reads(folded) == 2  # channels and H, W; not the batch
    assert sum(n.op_type == "Shape" for n in folded.graph.node) == 2  # the batch and shape2 still read at run time
    for batch in (1, 3):
        x = {"input": np.random.default_rng(batch).standard_normal((batch, 4, 6, 6)).astype(np.float32)}
        expected, got = (make_session(m, threads=1).run(None, x)[0] for m in (model, folded))
        np.testing.assert_array_equal(got, expected)


def test_shape_folding_from_shapes_worked_out_in_a_child_is_the_same():
    """The symbolic shapes of the model, worked out in a forked child (so that sympy stays
    out of the converting process), fold exactly what in-process inference folds."""
    from onnxshrink.quantize.rewrites import fold_static_shape_reads
    from onnxshrink.runtime import ForkedJob
    from onnxshrink.stats import shapes_for_folding

    model = _shuffle_net()
    shapes = ForkedJob(shapes_for_folding, model).result()
    assert shapes is not None and shapes["input"] == ["n", 4, 6, 6]
    here, there = onnx.ModelProto(), onnx.ModelProto()
    here.CopyFrom(model)
    there.CopyFrom(model)
    assert fold_static_shape_reads(here) == fold_static_shape_reads(there, shapes=shapes) == 2
    assert here.SerializeToString() == there.SerializeToString()


def test_shape_folding_with_given_shapes_runs_no_symbolic_inference(monkeypatch):
    from onnxshrink.quantize import rewrites
    from onnxshrink.stats import shapes_for_folding

    model = _shuffle_net()
    shapes = shapes_for_folding(model)
    calls: list[bool] = []
    real = rewrites.infer_shapes

    def recording(m, symbolic=False, merge_dims=True):  # noqa: ANN001, ANN202
        calls.append(symbolic)
        return real(m, symbolic=symbolic, merge_dims=merge_dims)

    monkeypatch.setattr(rewrites, "infer_shapes", recording)
    assert rewrites.fold_static_shape_reads(model, shapes=shapes) == 2
    assert calls and not any(calls)  # onnx's inference only: the first round's shapes were given


def test_shrink_leaves_no_child_process_or_job_file(tmp_path, monkeypatch):
    """The forked children of a conversion (crash probe, shape-inference job) are gone, and
    their files too, when shrink returns, and when it fails."""
    import multiprocessing
    import tempfile

    from onnxshrink.errors import ShrinkError
    from onnxshrink.shrink import ShrinkOptions, shrink

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = tmp_path / "shuffle.onnx"
    onnx.save(_shuffle_net(), path)
    shrink(path, tmp_path / "out.onnx", ShrinkOptions(calibration="random", measure_latency=False))
    assert (tmp_path / "out.onnx").exists()
    bad = tmp_path / "calib.npz"
    np.savez(bad, input=np.zeros((2, 3, 6, 6), np.float32))  # wrong channel count: refused
    with pytest.raises(ShrinkError):
        shrink(path, tmp_path / "out2.onnx", ShrinkOptions(calibration=str(bad), measure_latency=False))
    assert not multiprocessing.active_children()
    assert not list(tmp_path.glob("onnxshrink-job-*"))


def test_forked_job_gives_none_when_the_child_fails():
    from onnxshrink.runtime import ForkedJob

    assert ForkedJob(sum, [1, 2, 3]).result() == 6
    assert ForkedJob(int, "not a number").result() is None  # raised in the child
    assert ForkedJob(os.abort).result() is None  # died by a signal
    job = ForkedJob(time.sleep, 30)
    job.cancel()
    assert job.result() is None


def test_shape_of_a_dequantized_tensor_reads_the_quantized_one():
    model = _shuffle_net()
    result = quantize_int8(model, RandomDataset(model_input_specs(model), count=20, seed=0))
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    shape_sources = [producers.get(n.input[0]) for n in result.model.graph.node if n.op_type == "Shape"]
    assert shape_sources and "DequantizeLinear" not in shape_sources
    assert result.fidelity.sqnr_db > 30


def test_concat_output_takes_the_union_of_its_inputs_ranges():
    """So QLinearConcat copies the widest input as it is instead of requantizing all."""
    from onnx import numpy_helper

    model = _dense_block_net(seed=3)
    result = quantize_int8(model, RandomDataset(model_input_specs(model), count=60, seed=4), Int8Config(method="mse"))
    qdq = result.model
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    concat = next(n for n in qdq.graph.node if n.op_type == "Concat")
    in_scales = [float(inits[producers[name].input[1]]) for name in concat.input]
    reader = next(n for n in qdq.graph.node if concat.output[0] in n.input and n.op_type == "QuantizeLinear")
    out_scale = float(inits[reader.input[1]])
    assert out_scale == pytest.approx(max(in_scales), rel=1e-6)


def test_expected_drop_weighs_flips_by_the_references_confidence():
    """A flip between classes the fp32 model cannot tell apart costs ~0 expected accuracy;
    a confident flip costs a whole sample. Plain agreement counts both as one."""
    from onnxshrink.verify import FidelityMeter, class_probabilities

    near_tie = np.array([[2.0, 1.999, -3.0]], np.float32)
    confident = np.array([[9.0, 0.0, -3.0]], np.float32)
    flipped = np.array([[0.0, 1.0, 0.0]], np.float32)  # argmax 1
    meter = FidelityMeter()
    meter.update([near_tie], [flipped])
    meter.update([confident], [flipped])
    meter.update([confident], [confident])
    meter.update([confident], [confident])
    fid = meter.result()
    assert fid.top1_agreement == 0.5
    p = class_probabilities(confident)
    assert fid.expected_drop_points == pytest.approx(100 * (0.0 + 0.0002 + p[0, 0] - p[0, 1]) / 4, abs=0.05)
    # distributions are used as they are; independent sigmoids give no distribution: flips count whole
    assert np.allclose(class_probabilities(np.array([[0.7, 0.3]])), [[0.7, 0.3]])
    assert class_probabilities(np.array([[0.9, 0.8]])) is None
    sigmoid = FidelityMeter()
    sigmoid.update([np.array([[0.9, 0.8]])], [np.array([[0.8, 0.9]])])
    assert sigmoid.result().expected_drop_points == 100.0


def test_default_target_uses_the_confidence_weighted_drop_and_an_explicit_one_agreement():
    from onnxshrink.quantize.pipeline import _drop_points, _target
    from onnxshrink.verify import Fidelity

    fid = Fidelity(samples=32, sqnr_db=25.0, cosine=0.99, max_abs_error=0.1, top1_agreement=0.9, expected_drop_points=0.2)
    default = _target(Int8Config(), classify=True)
    explicit = _target(Int8Config(max_drop=1.0), classify=True)
    assert _drop_points(fid, default) == 0.2
    assert _drop_points(fid, explicit) == pytest.approx(10.0)
    # far-off outputs (an embedding's near-uniform softmax would excuse any flip): plain disagreement
    fid.sqnr_db = 12.0
    assert _drop_points(fid, default) == pytest.approx(10.0)


def test_by_name_index_answers_like_a_scan():
    """The quantizer's initializer lookups through the index: as a scan, across appends,
    removals (positions shift) and duplicate names (the first wins)."""
    from onnxshrink.quantize.engine import ByName, first_by_name

    graph = onnx.GraphProto()
    graph.initializer.extend(numpy_helper.from_array(np.full(1, i, np.float32), f"t{i}") for i in range(6))
    index = ByName()
    items = graph.initializer

    def agree(names: list[str]) -> None:
        for name in names:
            a, b = index.find(name, items), first_by_name(name, items)
            assert (a is None and b is None) or (a is not None and b is not None and a.SerializeToString() == b.SerializeToString())

    names = [f"t{i}" for i in range(9)] + ["dup"]
    agree(names)
    items.remove(items[2])  # later positions shift; the length changes
    agree(names)
    items.remove(items[0])
    items.extend([numpy_helper.from_array(np.full(1, 7, np.float32), "t7")])  # same length, new last
    agree(names)
    items.extend([numpy_helper.from_array(np.full(1, 8, np.float32), "dup"), numpy_helper.from_array(np.full(1, 9, np.float32), "dup")])
    agree(names)
    assert numpy_helper.to_array(index.find("dup", items))[0] == 8
    # One removed, one appended under the last one's name: same length, same last name.
    items.remove(items[1])
    items.extend([numpy_helper.from_array(np.full(1, 10, np.float32), "dup")])
    agree(names)
    assert numpy_helper.to_array(index.find("dup", items))[0] == 8
    assert index.find(items[0].name, [t for t in items]) is not None  # a plain list is scanned


def test_readers_index_renames_like_a_scan():
    """The quantizer's input renames through the index give the graph that renaming by a scan
    of every node gives, across appended nodes, a removal, single-node renames and a re-sort."""
    from onnx import helper

    from onnxshrink.quantize.engine import Readers, _rename_in_all_nodes

    def graph() -> onnx.GraphProto:
        g = onnx.GraphProto()
        g.node.extend([
            helper.make_node("Relu", ["x"], ["a"], name="n0"),
            helper.make_node("Add", ["a", "x"], ["b"], name="n1"),
            helper.make_node("Mul", ["b", "b"], ["c"], name="n2"),
        ])  # fmt: skip
        return g

    ours, scanned = graph(), graph()
    readers = Readers(lambda: ours)

    def in_node(g: onnx.GraphProto, name: str, old: str, new: str) -> None:
        node = next(n for n in g.node if n.name == name)
        for i, value in enumerate(node.input):
            if value == old:
                node.input[i] = new

    def check() -> None:
        assert ours.SerializeToString() == scanned.SerializeToString()

    def rename(old: str, new: str) -> None:
        readers.rename(old, new)
        _rename_in_all_nodes(scanned, "input", old, new)
        check()

    rename("x", "x_dq")
    for g in (ours, scanned):
        g.node.extend([helper.make_node("Sigmoid", ["b"], ["d"], name="n3")])
    rename("b", "b_dq")  # the appended node reads it too
    for g in (ours, scanned):
        g.node.remove(g.node[0])
    rename("a", "a_dq")
    readers.rename_in(next(n for n in ours.node if n.name == "n2"), "b_dq", "b2")
    in_node(scanned, "n2", "b_dq", "b2")
    rename("b2", "b3")  # found through the single-node rename
    for g in (ours, scanned):
        kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
        g.ClearField("node")
        g.node.extend(reversed(kept))  # re-sorted: new node objects
    rename("b_dq", "b4")
    readers.rename("b4", "b5", only={"n3"})
    in_node(scanned, "n3", "b4", "b5")
    check()
    assert sum(list(n.input) == ["b5"] for n in ours.node) == 1  # n3 only


def test_derived_ranges_skip_measuring_and_leave_the_int8_model_unchanged(monkeypatch):
    """Concat outputs (the union of their inputs) and a Relu's sole input (the Relu's range)
    are not measured in calibration; the QDQ model is byte-identical to measuring them."""
    from onnxshrink.quantize import calibrate

    model = _dense_block_net(seed=5)
    data = RandomDataset(model_input_specs(model), count=24, seed=6)
    passes: list[calibrate.CalibrationPass] = []
    real = calibrate.collect_stats

    def recording(prepared, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        passes.append(real(prepared, *args, **kwargs))
        passes[-1].relu_input = next(n.input[0] for n in prepared.graph.node if n.op_type == "Relu")  # type: ignore[attr-defined]
        return passes[-1]

    monkeypatch.setattr("onnxshrink.quantize.pipeline.collect_stats", recording)
    derived_run = quantize_int8(model, data, Int8Config(method="mse"))
    calibration = passes[-1]
    assert calibration.derived["cat"] == ("input", "c1")
    assert calibration.derived[calibration.relu_input] == ("r",)  # type: ignore[attr-defined]
    assert not set(calibration.derived) & set(calibration.stats)  # not measured
    monkeypatch.setattr(calibrate, "derivable_ranges", lambda m, names: {})
    measured_run = quantize_int8(model, data, Int8Config(method="mse"))
    assert not passes[-1].derived and {"cat", "r"} <= set(passes[-1].stats)
    assert derived_run.model.SerializeToString() == measured_run.model.SerializeToString()


def test_shrink_reports_macs_of_shapes_computed_at_run_time(tmp_path):
    """A Conv on half the channels, sliced at an index computed from Shape (ShuffleNet's
    chunk): onnx's inference leaves its shape unknown, the probe child reports no total,
    and the symbolic count made beside the steps fills it in."""
    from onnx import helper

    from onnxshrink.runtime import CrashProbe
    from onnxshrink.shrink import ShrinkOptions, shrink
    from onnxshrink.stats import count_macs

    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2**62], np.int64), "end"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["x"], name="conv"),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "i1"], ["c"], name="channels"),
        helper.make_node("Div", ["c", "two"], ["half"], name="half"),
        helper.make_node("Unsqueeze", ["half", "zero"], ["start"], name="start"),
        helper.make_node("Slice", ["x", "start", "end", "axis1"], ["second"], name="chunk"),
        helper.make_node("Conv", ["second", "w2"], ["output"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "chunk", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 4, "h", "w"])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "chunk.onnx"
    onnx.save(model, path)
    assert count_macs(model, symbolic=False).total is None
    expected = count_macs(model).total
    assert expected == 4 * 4 * 36 + 4 * 2 * 36
    probe = CrashProbe(path, model)
    probe.wait()
    assert probe.mac_total == (None,)
    outcome = shrink(path, tmp_path / "out.onnx", ShrinkOptions(calibration="random", measure_latency=False))
    assert outcome.macs_before == expected


def _shared_bias_net() -> onnx.ModelProto:
    """A Conv whose bias initializer an Add also reads (what onnxruntime's ConstantSharing
    makes of equal biases, e.g. the zeros of a freshly initialised ConvNeXt)."""
    from onnx import helper

    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "bias"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["nhwc", "fc"], ["m"], name="linear"),
        helper.make_node("Add", ["m", "bias"], ["output"], name="linear_bias"),
    ]
    graph = helper.make_graph(
        nodes, "shared_bias", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 8, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_shared_conv_bias_gets_its_own_copy_so_the_conv_fuses(monkeypatch):
    from onnxshrink.quantize import pipeline
    from onnxshrink.quantize.rewrites import unshare_biases

    model = _shared_bias_net()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert unshare_biases(copy) == 1 and unshare_biases(copy) == 0
    conv = next(n for n in copy.graph.node if n.op_type == "Conv")
    assert conv.input[2] != "bias" and next(n for n in copy.graph.node if n.op_type == "Add").input[1] == "bias"
    data = RandomDataset(model_input_specs(model), count=16, seed=1)
    result = quantize_int8(model, data, Int8Config(fusion_aware=False))
    assert result.fusion.optimized_ops.get("QLinearConv") == 1  # the Conv is an int8 kernel
    assert not [u for u in result.fusion.unfused if u.op_type == "Conv"]
    assert result.fidelity.sqnr_db > 25
    monkeypatch.setattr(pipeline, "unshare_biases", lambda m: 0)
    shared = quantize_int8(model, data, Int8Config(fusion_aware=False))
    assert [u.node for u in shared.fusion.unfused if u.op_type == "Conv"] == ["conv"]  # what it fixes


def test_fold_check_on_the_calibration_pass_and_a_failed_one_prepares_again(tmp_path, monkeypatch, caplog):
    """With the model's file at hand, the folding is checked on the outputs the calibration
    pass records; if they moved, the model is prepared again from the file, each step checked
    on its own (here the folding is made to corrupt a weight, so it is then skipped)."""
    import logging

    from onnxshrink.passes import prepare as prepare_module

    model = conv_net(seed=3)
    path = tmp_path / "net.onnx"
    onnx.save(model, path)
    data = RandomDataset(model_input_specs(model), count=12, seed=2)

    result = quantize_int8(load_model(path)[0], data, source=path)
    fold = next(s for s in result.prepare.steps if s["step"].startswith("fold constants"))
    assert fold["applied"] and fold["checked"] == "on the calibration pass" and fold["max_relative_error"] <= 1e-4
    assert not result.prepare.unchecked

    real = prepare_module.basic_optimize_with_outputs

    def corrupting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        optimized, outputs, checked = real(*args, **kwargs)
        weight = next(t for t in optimized.graph.initializer if len(t.dims) == 4)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 3, weight.name))
        if checked is not None:  # the step-by-step check sees the corrupted copy too
            checked = prepare_module.outputs_on(optimized, args[1])
        return optimized, outputs, checked

    monkeypatch.setattr(prepare_module, "basic_optimize_with_outputs", corrupting)
    with caplog.at_level(logging.WARNING, logger="onnxshrink"):
        result = quantize_int8(load_model(path)[0], data, source=path)
    assert any("preparing again" in r.getMessage() for r in caplog.records)
    fold = next(s for s in result.prepare.steps if s["step"].startswith("fold constants"))
    assert not fold["applied"] and "outputs moved" in fold["reason"]
    assert result.fidelity.sqnr_db > 25  # quantized from the unchanged model
