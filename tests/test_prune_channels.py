"""Structured channel pruning, checked with real onnxruntime sessions on models built in code.

The exactness tests zero chosen channels at their source (``silence_channels``), so they
contribute nothing, then remove exactly those channels: the outputs must not change.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import ConfigError, UnsupportedModelError
from onnxshrink.modelio import load_model, save_model
from onnxshrink.prune import (
    ChannelPruneConfig,
    analyze_channels,
    prune_channel_indices,
    prune_channels,
)
from onnxshrink.prune.testing import BUILDERS, NetBuilder, silence_channels
from onnxshrink.stats import count_macs
from onnxshrink.testing import run_ort

EXACT = ["residual", "mobilenet", "dense", "se", "mlp", "misc"]


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def random_units(model: onnx.ModelProto, *, seed: int = 0, share: float = 0.4) -> dict[str, list[int]]:
    """A random subset of units of every prunable group."""
    rng = np.random.default_rng(seed)
    out = {}
    for group in analyze_channels(model).groups:
        if group.prunable:
            count = max(1, min(group.units - 1, int(share * group.units)))
            out[group.id] = sorted(int(u) for u in rng.choice(group.units, size=count, replace=False))
    return out


@pytest.mark.parametrize("name", EXACT)
def test_pruning_silenced_channels_keeps_outputs(name, feeds, caplog):
    model = BUILDERS[name]()
    units = random_units(model)
    assert units, "every test net has prunable groups"
    silence_channels(model, units)
    expected = run_ort(model, feeds)
    with caplog.at_level(logging.WARNING, logger="onnxshrink"):
        report = prune_channel_indices(model, units)
    check(model)
    for got, want in zip(run_ort(model, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert report.count("pruned") == len(units)
    for group in report.groups:
        if group.id in units:
            assert group.units_after == group.units_before - len(units[group.id])
            assert all(after < before for after, before in zip(group.channels_after, group.channels_before))
    assert report.macs_after == count_macs(model).total < report.macs_before
    assert report.params_after < report.params_before
    assert "predicted MACs" not in caplog.text  # the analytic MAC model matched the counted one


def test_each_group_alone_is_exact(feeds):
    """Concatenations, a channel Split and a Slice: every group pruned on its own."""
    base = BUILDERS["dense"]()
    for group_id, units in random_units(base, seed=3).items():
        model = copy.deepcopy(base)
        silence_channels(model, {group_id: units})
        expected = run_ort(model, feeds)[0]
        prune_channel_indices(model, {group_id: units})
        check(model)
        np.testing.assert_allclose(run_ort(model, feeds)[0], expected, rtol=0, atol=1e-5, err_msg=group_id)


def test_groups_couple_what_must_be_pruned_together():
    groups = {g.producers[0]: g for g in analyze_channels(BUILDERS["mobilenet"]()).groups}
    assert groups["stem"].producers == ["stem", "ir1_project"]  # residual Add
    assert groups["ir1_expand"].producers == ["ir1_expand", "ir1_dw"]  # depthwise
    assert groups["ir2_expand"].channels == [32, 64] and groups["ir2_expand"].units == 32  # multiplier 2
    assert groups["rg_a"].units == 4  # groups=4: whole groups only
    se = {g.producers[0]: g for g in analyze_channels(BUILDERS["se"]()).groups}
    assert se["stem"].producers == ["stem", "dw", "se_expand", "project"]  # SE gate Mul + residual
    assert se["se_reduce"].prunable and se["se2_fc1"].prunable


def test_grouped_conv_keeps_whole_groups(feeds):
    model = BUILDERS["mobilenet"]()
    prune_channel_indices(model, {"rg_a": [1, 3]})
    check(model)
    node = next(n for n in model.graph.node if n.name == "rg_b_grouped")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == 2
    weights = {t.name: t for t in model.graph.initializer}
    assert list(weights["rg_b_grouped.weight"].dims) == [16, 8, 3, 3]
    run_ort(model, feeds)


def test_ratio_zero_changes_nothing(feeds):
    for name, build in BUILDERS.items():
        model = build()
        before = model.SerializeToString()
        report = prune_channels(model, ChannelPruneConfig(ratio=0.0))
        assert model.SerializeToString() == before, name
        assert not report.modified and report.count("pruned") == 0
        assert report.macs_after == report.macs_before and report.params_after == report.params_before


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_half_ratio_gives_valid_smaller_models(name, feeds):
    model = BUILDERS[name]()
    expected = run_ort(model, feeds)
    report = prune_channels(model, ChannelPruneConfig(ratio=0.5))
    check(model)
    got = run_ort(model, feeds)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert report.macs_after < report.macs_before and report.bytes_after < report.bytes_before
    for group in report.groups:
        if group.status == "pruned":
            assert group.units_after == group.units_before - int(0.5 * group.units_before)
    json.dumps(report.to_json())
    assert "Groups" in report.render()


def test_skipped_groups_are_reported_with_reasons():
    report = prune_channels(BUILDERS["shuffle"](), ChannelPruneConfig(ratio=0.5))
    by_producer = {g.producers[0]: g for g in report.groups}
    shuffle = by_producer["stem"]
    assert shuffle.status == "skipped" and shuffle.skip_reasons[0].kind == "reshape"
    assert "channel shuffle" in shuffle.skip_reasons[0].detail
    side = by_producer["side_output"]
    assert (
        side.status == "skipped"
        and side.skip_reasons[0].kind == "graph-output"
        and "'side'" in side.skip_reasons[0].detail
    )
    assert by_producer["after_shuffle"].status == "pruned"
    assert report.skip_tally == {"reshape": 1, "graph-output": 2}
    mlp = {g.producers[0]: g for g in analyze_channels(BUILDERS["mlp"]()).groups}
    assert mlp["stem"].skip_reasons[0].kind == "layernorm" and mlp["mlp_fc1"].prunable


def _conv_into(
    op_type: str, *, domain: str = "", weight_is_input: bool = False, **attrs: object
) -> onnx.ModelProto:
    """conv 'first' -> <op> -> conv 'second' -> head."""
    b = NetBuilder(1)
    x = b.conv("input", 3, 8, name="first")
    b.nodes.append(helper.make_node(op_type, [x], ["mid"], name="odd", domain=domain, **attrs))
    logits = b.head(b.conv("mid", 8, 8, name="second"), 8)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])]
    inits = b.inits
    if weight_is_input:
        weight = next(t for t in inits if t.name == "second.weight")
        inits = [t for t in inits if t is not weight]
        inputs.append(helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, list(weight.dims)))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(
        helper.make_graph(b.nodes, "blocked", inputs, outputs, inits), opset_imports=opsets
    )


def test_unknown_ops_and_non_constant_weights_block():
    groups = {g.producers[0]: g for g in analyze_channels(_conv_into("LRN", size=3)).groups}
    assert groups["first"].skip_reasons[0].kind == "unsupported-op" and groups["second"].prunable
    groups = {g.producers[0]: g for g in analyze_channels(_conv_into("FancyOp", domain="com.example")).groups}
    assert "com.example.FancyOp" in groups["first"].skip_reasons[0].detail
    model = _conv_into("Relu", weight_is_input=True)
    groups = {g.producers[0]: g for g in analyze_channels(model).groups}
    assert groups["first"].skip_reasons[0].kind == "non-constant-weight"
    assert groups["second"].skip_reasons[0].kind == "non-constant-weight"
    before = model.SerializeToString()
    prune_channels(model, ChannelPruneConfig(ratio=0.5))
    assert model.SerializeToString() == before


def test_exclude_per_layer_round_to_min_channels():
    report = prune_channels(
        BUILDERS["residual"](), ChannelPruneConfig(ratio=0.5, exclude=("b2*",), per_layer={"b1c1": 0.25})
    )
    by = {g.producers[0]: g for g in report.groups}
    assert by["b2c1"].skip_reasons[0].kind == "excluded" and by["b2c2"].status == "skipped"
    assert by["b1c1"].channels_after == [12] and by["b1c1"].ratio == 0.25
    # 'stem' feeds b2c1 and b2down: excluding a node leaves its weights whole, inputs included
    assert by["stem"].skip_reasons[0].kind == "excluded" and by["stem"].channels_after == [16, 16]
    report = prune_channels(BUILDERS["dense"](), ChannelPruneConfig(ratio=0.6, round_to=4, min_channels=6))
    for g in report.groups:
        if g.status == "pruned":
            assert all(c % 4 == 0 and c >= 6 for c in g.channels_after), g
    with pytest.raises(ConfigError, match="matches no"):
        prune_channels(BUILDERS["residual"](), ChannelPruneConfig(ratio=0.5, per_layer={"nonexistent": 0.1}))


def test_target_mac_reduction():
    model = BUILDERS["residual"]()
    report = prune_channels(model, ChannelPruneConfig(target_mac_reduction=0.4))
    assert report.target_met
    reduction = 1 - report.macs_after / report.macs_before
    assert 0.4 <= reduction < 0.5, reduction
    assert report.macs_after == count_macs(model).total
    report = prune_channels(BUILDERS["shuffle"](), ChannelPruneConfig(target_mac_reduction=0.95))
    assert report.target_met is False and "out of reach" in report.notes[0]


def test_bn_gamma_importance_keeps_largest_gammas():
    model = BUILDERS["residual"]()
    bn = next(
        n for n in model.graph.node if n.op_type == "BatchNormalization" and n.input[0].startswith("b1c1")
    )
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bn.input[1]))
    report = prune_channels(model, ChannelPruneConfig(ratio=0.5, importance="bn_gamma"))
    kept = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bn.input[1]))
    np.testing.assert_array_equal(kept, gamma[np.sort(np.argsort(-gamma)[:8])])
    assert {g.importance for g in report.groups if g.status == "pruned"} == {"bn_gamma"}
    report = prune_channels(BUILDERS["mlp"](), ChannelPruneConfig(ratio=0.5, importance="bn_gamma"))
    assert any("ranked by L1" in n for n in report.notes)


def test_shared_constants_are_unshared(feeds):
    """TorchScript-style Identity copies of one bias feeding convs of different groups."""
    b = NetBuilder(2)
    zero = b.const("shared_bias", np.zeros(8, np.float32))
    x = "input"
    for k in range(2):
        w = b.const(f"c{k}.weight", b.rng.normal(0, 0.3, (8, 3 if k == 0 else 8, 3, 3)).astype(np.float32))
        bias = b.op("Identity", [zero], name=f"copy{k}")
        x = b.op("Relu", [b.op("Conv", [x, w, bias], name=f"c{k}", pads=[1] * 4)])
    model = b.finish(b.head(x, 8))
    units = {"c0": [1, 2], "c1": [0, 5, 7]}
    silence_channels(model, units)
    expected = run_ort(model, feeds)[0]
    prune_channel_indices(model, units)
    check(model)
    np.testing.assert_allclose(run_ort(model, feeds)[0], expected, atol=1e-5)
    names = {t.name for t in model.graph.initializer}
    assert "shared_bias" not in names and not any(
        n.op_type == "Identity" and n.name.startswith("copy") for n in model.graph.node
    )


def test_split_without_sizes_gets_explicit_sizes(feeds):
    b = NetBuilder(4)
    x = b.cbr("input", 3, 16, name="stem")
    left, right = b.op_n("Split", [x], 2, axis=1, num_outputs=2)
    x = b.op("Concat", [b.cbr(left, 8, 8, name="l"), b.cbr(right, 8, 8, name="r")], axis=1)
    model = b.finish(b.head(x, 16), opset=18)
    silence_channels(model, {"stem": [0, 1, 2, 9]})
    expected = run_ort(model, feeds)[0]
    prune_channel_indices(model, {"stem": [0, 1, 2, 9]})
    check(model)
    np.testing.assert_allclose(run_ort(model, feeds)[0], expected, atol=1e-5)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    sizes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == split.input[1]))
    assert sizes.tolist() == [5, 7]


def test_models_without_loaded_weights_are_refused(tmp_path):
    path = save_model(BUILDERS["residual"](), tmp_path / "m.onnx", external_data=True)
    lazy, _ = load_model(path, load_weights=False)
    with pytest.raises(UnsupportedModelError, match="external data"):
        prune_channels(lazy, ChannelPruneConfig(ratio=0.5))


def test_prune_channel_indices_refuses_bad_requests():
    model = BUILDERS["shuffle"]()
    with pytest.raises(ConfigError, match="no channel group"):
        prune_channel_indices(model, {"nope": [0]})
    with pytest.raises(ConfigError, match="cannot be pruned: Reshape"):
        prune_channel_indices(model, {"stem": [0]})
    with pytest.raises(ConfigError, match="every unit"):
        prune_channel_indices(model, {"after_shuffle": list(range(16))})
    with pytest.raises(ConfigError, match="units 0..15"):
        prune_channel_indices(model, {"after_shuffle.weight": [16]})


def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="exactly one"):
        ChannelPruneConfig(ratio=0.5, target_mac_reduction=0.5)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        ChannelPruneConfig(ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        ChannelPruneConfig(ratio=0.5, round_to=0)
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        ChannelPruneConfig.from_dict({"ratoi": 0.5})
    with pytest.raises(ConfigError, match="regular expression"):
        ChannelPruneConfig(ratio=0.5, exclude=("re:(",))
    cfg = ChannelPruneConfig(
        ratio=0.3, importance="l2", per_layer={"conv*": 0.1}, exclude=("re:^fc",), round_to=8
    )
    assert ChannelPruneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
