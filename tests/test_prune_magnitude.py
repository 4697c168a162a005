"""Unstructured magnitude pruning and per-layer sensitivity, on real onnxruntime sessions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxshrink.errors import ConfigError
from onnxshrink.modelio import load_model, save_model
from onnxshrink.prune import MagnitudePruneConfig, magnitude_sensitivity, prune_magnitude
from onnxshrink.prune.testing import BUILDERS
from onnxshrink.testing import conv_net, run_ort

WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weight initializers of Conv/Gemm/MatMul, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    names = [n.input[1] for n in model.graph.node if n.op_type in WEIGHT_OPS and n.input[1] in inits]
    return {name: numpy_helper.to_array(inits[name]) for name in dict.fromkeys(names)}


def test_layer_scope_reaches_the_requested_sparsity_exactly():
    model = BUILDERS["residual"]()
    before = weights(model)
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.37))
    after = weights(model)
    names = list(after)
    for name in names[1:-1]:
        assert np.count_nonzero(after[name] == 0) == round(0.37 * after[name].size), name
        kept = after[name] != 0
        np.testing.assert_array_equal(after[name][kept], before[name][kept])  # survivors untouched
        assert np.abs(after[name][kept]).min() >= np.abs(before[name][~kept]).max()  # smallest went
    assert report.sparsity == pytest.approx(0.37, abs=1e-3)
    assert [layer.skipped is None for layer in report.layers] == [False, True, True, True, True, True, False]


def test_global_scope_uses_one_threshold():
    model = BUILDERS["dense"]()
    before = weights(model)
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, scope="global"))
    after = weights(model)
    pruned = list(after)[1:-1]
    total = sum(after[n].size for n in pruned)
    assert sum(np.count_nonzero(after[n] == 0) for n in pruned) == round(0.5 * total)
    assert report.threshold is not None
    for n in pruned:
        assert np.all(np.abs(before[n][after[n] == 0]) <= report.threshold)
        assert np.all(np.abs(after[n][after[n] != 0]) >= report.threshold)
    sparsities = [layer.sparsity for layer in report.layers if layer.skipped is None]
    assert max(sparsities) - min(sparsities) > 0.1  # layers differ under one threshold


def test_threshold_zeroes_exactly_the_small_weights():
    model = conv_net(channels=(3, 8, 16, 16), seed=3)
    before = weights(model)
    report = prune_magnitude(model, MagnitudePruneConfig(threshold=0.1, include_first_last=True))
    for name, array in weights(model).items():
        small = np.abs(before[name]) < 0.1
        assert np.all(array[small] == 0) and np.array_equal(array[~small], before[name][~small])
    assert report.threshold == 0.1 and all(layer.skipped is None for layer in report.layers)


def test_first_last_and_exclude():
    model = BUILDERS["residual"]()
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, exclude=("b2*", "re:c1\\.weight$")))
    skipped = {layer.weight: layer.skipped for layer in report.layers}
    assert skipped["stem.weight"].startswith("first") and skipped["fc.weight"].startswith("last")
    assert (
        skipped["b2c2.weight"] == "excluded by pattern 'b2*'"
        and skipped["b2down.weight"] == "excluded by pattern 'b2*'"
    )
    assert skipped["b1c1.weight"] == "excluded by pattern 're:c1\\.weight$'"
    assert skipped["b1c2.weight"] is None
    assert [name for name, array in weights(model).items() if np.any(array == 0)] == ["b1c2.weight"]
    report = prune_magnitude(
        BUILDERS["residual"](), MagnitudePruneConfig(sparsity=0.5, include_first_last=True)
    )
    assert all(layer.skipped is None for layer in report.layers)


def test_zeros_are_real_zeros_in_the_saved_model(tmp_path):
    model = BUILDERS["se"]()
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.6))
    path = save_model(model, tmp_path / "sparse.onnx")
    loaded, _ = load_model(path)
    onnx.checker.check_model(loaded, full_check=True)
    stored = weights(loaded)
    for layer in report.layers:
        array = stored[layer.weight]
        zeros = array == 0
        assert np.count_nonzero(zeros) / array.size == pytest.approx(layer.sparsity)
        assert not np.any(np.signbit(array[zeros]))  # +0.0, not -0.0
    np.testing.assert_array_equal(run_ort(str(path), feeds)[0], run_ort(model, feeds)[0])
    assert report.gzip_after < 0.85 * report.gzip_before
    assert report.bytes_after == report.bytes_before and report.params_after == report.params_before
    assert "dense speed" in report.notes[0]
    text = report.render()
    assert "gzip" in text and "dense speed" in text
    json.dumps(report.to_json())


def test_weights_with_other_uses_are_left_alone():
    model = conv_net(channels=(3, 8, 8, 8), seed=2)
    shared = model.graph.node[3].input[1]  # conv1.weight, also added to a constant below
    model.graph.node.append(helper.make_node("Add", [shared, shared], ["twice"]))
    model.graph.output.append(helper.make_tensor_value_info("twice", onnx.TensorProto.FLOAT, None))
    before = weights(model)[shared]
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.5, include_first_last=True))
    layer = next(layer for layer in report.layers if layer.weight == shared)
    assert layer.skipped is not None and "not as a weight" in layer.skipped
    np.testing.assert_array_equal(weights(model)[shared], before)


def test_sparsity_zero_changes_nothing():
    model = BUILDERS["mobilenet"]()
    before = model.SerializeToString()
    report = prune_magnitude(model, MagnitudePruneConfig(sparsity=0.0))
    assert model.SerializeToString() == before and report.sparsity == 0.0


def test_sensitivity_prunes_one_layer_at_a_time():
    model = BUILDERS["residual"]()
    before = model.SerializeToString()
    rng = np.random.default_rng(0)
    samples = [{"input": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    results = magnitude_sensitivity(model, samples, 0.5)
    assert model.SerializeToString() == before
    assert [r.weight for r in results] == list(weights(model))  # first and last included
    for r in results:
        assert r.sparsity == pytest.approx(0.5, abs=0.01)
        assert np.isfinite(r.fidelity.sqnr_db) and r.fidelity.samples == 2
        assert r.fidelity.top1_agreement is not None
    json.dumps([r.to_json() for r in results])


def test_config_validation():
    with pytest.raises(ConfigError, match="exactly one"):
        MagnitudePruneConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        MagnitudePruneConfig(sparsity=0.5, threshold=0.1)
    with pytest.raises(ConfigError, match="scope"):
        MagnitudePruneConfig(sparsity=0.5, scope="model")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="threshold"):
        MagnitudePruneConfig(threshold=-1.0)
    cfg = MagnitudePruneConfig(sparsity=0.5, scope="global", exclude=("fc*",))
    assert MagnitudePruneConfig.from_dict(cfg.to_dict()) == cfg
