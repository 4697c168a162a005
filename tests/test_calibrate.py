"""Streaming calibration statistics and range choice."""

from __future__ import annotations

import numpy as np
import pytest

from onnxshrink.quantize.calibrate import BINS, TensorStats, choose_range


def _stats(chunks: list[np.ndarray]) -> TensorStats:
    stats = TensorStats()
    for chunk in chunks:
        stats.update(chunk, histogram=True)
    return stats


def test_histogram_doubling_matches_a_direct_histogram():
    rng = np.random.default_rng(0)
    # Ranges grow over the stream, forcing several doublings.
    chunks = [rng.normal(0, s, 5000).astype(np.float32) for s in (0.1, 0.5, 2.0, 7.0)]
    stats = _stats(chunks)
    data = np.concatenate(chunks)
    direct, _ = np.histogram(data, bins=BINS, range=(-stats.radius, stats.radius))
    assert stats.hist.sum() == data.size
    # Merged bins may differ from a direct histogram only at the bin edges of early chunks.
    coarse = stats.hist.reshape(-1, 64).sum(axis=1)
    direct_coarse = direct.reshape(-1, 64).sum(axis=1)
    assert np.abs(coarse - direct_coarse).sum() <= 0.01 * data.size
    assert stats.lo == pytest.approx(float(data.min())) and stats.hi == pytest.approx(float(data.max()))


def test_memory_does_not_grow_with_samples():
    stats = _stats([np.random.default_rng(i).normal(size=1000).astype(np.float32) for i in range(200)])
    assert stats.hist.shape == (BINS,)


def test_minmax_is_the_observed_range_including_zero():
    stats = _stats([np.array([0.5, 2.0, 3.0], np.float32)])
    assert choose_range(stats, "minmax") == (0.0, 3.0)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_outliers_are_clipped_by_histogram_methods(method):
    rng = np.random.default_rng(1)
    relu_like = np.abs(rng.normal(0, 1, 200_000)).astype(np.float32)
    relu_like[:30] = 400.0  # a few outliers would waste almost all of uint8's levels
    stats = _stats([relu_like])
    lo, hi = choose_range(stats, method, percentile=99.9)
    assert lo == 0.0
    assert 2.0 < hi < 100.0, (method, hi)


def _quant_mse(x: np.ndarray, lo: float, hi: float) -> float:
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    return float(np.mean((x - (q - zero) * scale) ** 2))


def test_mse_range_beats_minmax_on_heavy_tails():
    x = np.random.default_rng(3).laplace(0, 1, 200_000).astype(np.float32)
    stats = _stats([x])
    lo, hi = choose_range(stats, "mse")
    assert hi < stats.hi and lo > stats.lo, "a heavy-tailed tensor should be clipped"
    assert _quant_mse(x, lo, hi) < 0.8 * _quant_mse(x, *choose_range(stats, "minmax"))


def test_mse_keeps_the_full_range_of_a_uniform_tensor():
    data = np.random.default_rng(2).uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = choose_range(_stats([data]), "mse")
    assert lo < -0.9 and hi > 0.9


def test_non_finite_activations_are_refused():
    from onnxshrink.errors import DataError

    with pytest.raises(DataError, match="NaN or infinite"):
        _stats([np.array([1.0, np.inf], np.float32)])


def _dynamic_conv() -> "onnx.ModelProto":
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_histogram_subsample_stays_bounded_when_later_samples_are_larger():
    """The stride comes from the first sample's shapes; a larger later sample must not send
    its whole activations out of onnxruntime (a folder of .npz may vary in shape)."""
    from onnxshrink.data import Sample
    from onnxshrink.quantize.calibrate import collect_stats, histogram_sample

    rng = np.random.default_rng(1)
    samples = [Sample({"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}), Sample({"x": rng.standard_normal((1, 3, 256, 256)).astype(np.float32)})]
    stats = collect_stats(_dynamic_conv(), iter(samples), histogram=True, calibrate=range(2)).stats
    cap = histogram_sample(2)
    assert 4 * 256 * 256 > 2 * cap  # the big sample really is bigger than the cap
    for name in ("c", "y"):
        assert stats[name].hist is not None
        assert 4 * 8 * 8 < stats[name].hist.sum() <= 4 * 8 * 8 + 2 * cap, name
    # exact minimum and maximum still come from the whole tensors
    assert stats["y"].hi > 3.0


def test_subsample_stride_is_coprime_with_the_size():
    import math

    from onnxshrink.quantize.calibrate import subsample_stride

    for size in (1, 2, 49, 62720, 1280 * 7 * 7, 2**20, 3 * 224 * 224):
        step = subsample_stride(size, 4096)
        assert step >= 1 and math.gcd(step, size) == 1
        assert size // step >= min(size, 4096) // 2


def test_histogram_subsample_covers_the_whole_tensor():
    """The cap must not cut off the end of a tensor of the first sample's size (its last
    channels would never reach the histogram)."""
    from onnxshrink.data import Sample
    from onnxshrink.quantize.calibrate import collect_stats

    model = _dynamic_conv()
    x = np.zeros((1, 3, 80, 80), np.float32)  # 19200 values: between one and two subsamples (16384)
    x[:, -1, -2:, :] = 5.0  # only the tensor's last values are non-zero
    stats = collect_stats(model, iter([Sample({"x": x})] * 3), histogram=True, calibrate=range(3)).stats
    hist = stats["x"].hist
    assert hist is not None and hist[len(hist) // 2 + 1 :].sum() > 0, "the tail values were never sampled"


def test_derivable_ranges_only_where_the_range_follows_for_sure():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnxshrink.quantize.calibrate import complete_ranges, derivable_ranges

    const = numpy_helper.from_array(np.ones((1, 2, 4, 4), np.float32), "const")
    nodes = [
        helper.make_node("Relu", ["x"], ["r0"]),  # graph input: measured
        helper.make_node("Neg", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["ra"]),  # a: Relu's only reader -> derived from ra
        helper.make_node("Neg", ["x"], ["b"]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Sigmoid", ["b"], ["sb"]),  # b has two readers: measured
        helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1),  # derived from its inputs
        helper.make_node("Concat", ["cat", "sb"], ["cat2"], axis=1),  # derived from a derived one
        helper.make_node("Concat", ["rb", "const"], ["catc"], axis=1),  # a weight: measured
        helper.make_node("Neg", ["cat2"], ["out_pre"]),
        helper.make_node("Relu", ["out_pre"], ["y"]),
        helper.make_node("Neg", ["catc"], ["y2"]),
    ]
    float4 = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [float4("x")], [float4("y"), float4("y2"), float4("out_pre")], [const])
    model = helper.make_model(graph)
    activations = ["x", "r0", "a", "ra", "b", "rb", "sb", "cat", "cat2", "catc", "out_pre", "y", "y2"]
    derived = derivable_ranges(model, activations)
    assert derived == {"a": ("ra",), "cat": ("ra", "rb"), "cat2": ("cat", "sb")}  # out_pre: a graph output
    ranges = {"ra": (0.0, 2.0), "rb": (0.0, 5.0), "sb": (-1.0, 1.0)}
    assert complete_ranges(ranges, derived) == 3
    assert ranges["a"] == (0.0, 2.0) and ranges["cat"] == (0.0, 5.0) and ranges["cat2"] == (-1.0, 5.0)
    onnx.checker.check_model(model)


def test_rearranged_outputs_are_derived_and_unquantized_tensors_skipped():
    from onnx import TensorProto, helper

    from onnxshrink.quantize.calibrate import derivable_ranges, unquantized_tensors
    from onnxshrink.quantize.config import DEFAULT_OP_TYPES

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),  # same values as c
        helper.make_node("Div", ["t", "k"], ["d"]),  # Div -> Erf: neither is quantized
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "t"], ["y"]),
    ]
    float4 = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [float4("x")], [float4("y")]))
    activations = ["x", "c", "t", "d", "e", "y"]
    assert unquantized_tensors(model, activations, DEFAULT_OP_TYPES) == {"d"}
    assert derivable_ranges(model, activations) == {"t": ("c",)}
