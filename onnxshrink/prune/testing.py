"""Small CNNs built in code that exercise the channel analysis, and a channel silencer.

Every builder returns a valid opset-17 model (``se_net``: opset 18) with seeded random weights, one input
``input`` of shape ``[batch, 3, 16, 16]`` and one output ``logits``, and needs neither torch
nor files. :func:`silence_channels` zeroes chosen channels at their source so that they
are exactly zero wherever they are read: pruning exactly those channels must then leave
the outputs unchanged, which is how the tests prove the surgery exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.prune._graph import GraphIndex
from onnxshrink.prune._layout import Selection, SliceConst, layout_length
from onnxshrink.prune.graph_channels import analyze_channels

SIZE = 16


class NetBuilder:
    """Append nodes and random initializers; ``finish`` makes a checked model."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, **attrs: Any) -> str:
        """Append a node with one output; return the output's name."""
        return self.op_n(op_type, inputs, 1, name=name, **attrs)[0]

    def op_n(
        self, op_type: str, inputs: Sequence[str], outputs: int, *, name: str | None = None, **attrs: Any
    ) -> list[str]:
        """Append a node with ``outputs`` outputs; return their names."""
        name = name or self.fresh(op_type.lower())
        outs = [f"{name}_out{k}" for k in range(outputs)] if outputs > 1 else [f"{name}_out"]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        *,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        name = name or self.fresh("conv")
        fan_in = cin // groups * k * k
        w = self.const(
            f"{name}.weight",
            self.rng.normal(0, (2.0 / fan_in) ** 0.5, (cout, cin // groups, k, k)).astype(np.float32),
        )
        inputs = [x, w]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        pad = k // 2
        return self.op(
            "Conv", inputs, name=name, pads=[pad] * 4, strides=[stride] * 2, group=groups, kernel_shape=[k, k]
        )

    def bn(self, x: str, c: int, *, name: str | None = None) -> str:
        name = name or self.fresh("bn")
        r = self.rng
        params = [
            self.const(f"{name}.scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.const(f"{name}.bias", r.normal(0, 0.1, c).astype(np.float32)),
            self.const(f"{name}.mean", r.normal(0, 0.1, c).astype(np.float32)),
            self.const(f"{name}.var", r.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x, *params], name=name)

    def cbr(self, x: str, cin: int, cout: int, *, act: str = "Relu", **kw: Any) -> str:
        y = self.bn(self.conv(x, cin, cout, bias=False, **kw), cout)
        if act == "Relu6":
            lo = self.const(self.fresh("zero"), np.array(0.0, np.float32))
            hi = self.const(self.fresh("six"), np.array(6.0, np.float32))
            return self.op("Clip", [y, lo, hi])
        return self.op(act, [y]) if act else y

    def gemm(self, x: str, fin: int, fout: int, *, name: str | None = None) -> str:
        name = name or self.fresh("fc")
        w = self.const(
            f"{name}.weight", self.rng.normal(0, (1.0 / fin) ** 0.5, (fout, fin)).astype(np.float32)
        )
        b = self.const(f"{name}.bias", self.rng.normal(0, 0.1, fout).astype(np.float32))
        return self.op("Gemm", [x, w, b], name=name, transB=1)

    def head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.op("GlobalAveragePool", [x])
        return self.gemm(self.op("Flatten", [pooled], axis=1), c, classes, name="fc")

    def finish(
        self,
        logits: str,
        *,
        name: str = "net",
        opset: int = 17,
        extra_outputs: Sequence[tuple[str, list[Any]]] = (),
    ) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_identity"))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", None])]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in extra_outputs]
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
            outputs,
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxshrink.prune.testing"
        )
        model.ir_version = min(model.ir_version, 10)
        onnx.checker.check_model(model, full_check=True)
        return model


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """ResNet-style: identity and projection shortcuts (Add couples the branches)."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, name="stem")
    y = b.bn(b.conv(b.cbr(x, 16, 16, name="b1c1"), 16, 16, bias=False, name="b1c2"), 16)
    x = b.op("Relu", [b.op("Add", [y, x])])
    y = b.bn(b.conv(b.cbr(x, 16, 24, stride=2, name="b2c1"), 24, 24, bias=False, name="b2c2"), 24)
    short = b.bn(b.conv(x, 16, 24, k=1, stride=2, bias=False, name="b2down"), 24)
    x = b.op("Relu", [b.op("Add", [y, short])])
    return b.finish(b.head(x, 24), name="residual_net")


def mobilenet_net(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style: inverted residuals with depthwise convs, a depthwise conv with a
    channel multiplier and a grouped conv (RegNet-style)."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, act="Relu6", name="stem")
    h = b.cbr(x, 16, 48, k=1, act="Relu6", name="ir1_expand")
    h = b.cbr(h, 48, 48, groups=48, act="Relu6", name="ir1_dw")
    h = b.cbr(h, 48, 16, k=1, act="", name="ir1_project")
    x = b.op("Add", [x, h])
    h = b.cbr(x, 16, 32, k=1, act="Relu6", name="ir2_expand")
    h = b.cbr(h, 32, 64, groups=32, stride=2, act="Relu6", name="ir2_dw_x2")  # multiplier 2
    h = b.cbr(h, 64, 24, k=1, act="", name="ir2_project")
    g = b.cbr(h, 24, 32, k=1, name="rg_a")
    g = b.cbr(g, 32, 32, groups=4, name="rg_b_grouped")
    g = b.bn(b.conv(g, 32, 24, k=1, bias=False, name="rg_c"), 24)
    x = b.op("Relu", [b.op("Add", [h, g])])
    return b.finish(b.head(x, 24), name="mobilenet_net")


def dense_net(seed: int = 0) -> onnx.ModelProto:
    """DenseNet/Inception-style: channel concatenations read by BN and convs, an inception
    module, a channel Split and Slice, and a VGG-style Flatten of a 4x4 map into a Gemm."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, name="stem")
    c = 16
    for k in range(3):  # dense layers: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, concatenated
        h = b.op("Relu", [b.bn(x, c)])
        h = b.cbr(h, c, 16, k=1, name=f"dense{k}_bottleneck")
        h = b.conv(h, 16, 8, name=f"dense{k}_grow")
        x = b.op("Concat", [x, h], axis=1)
        c += 8
    x = b.conv(b.op("Relu", [b.bn(x, c)]), c, 24, k=1, name="transition")
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    br1 = b.cbr(x, 24, 8, k=1, name="inc_1x1")
    br2 = b.cbr(b.cbr(x, 24, 8, k=1, name="inc_3x3_reduce"), 8, 12, name="inc_3x3")
    br3 = b.cbr(
        b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4),
        24,
        8,
        k=1,
        name="inc_pool_proj",
    )
    x = b.op("Concat", [br1, br2, br3], axis=1)  # 28 channels
    sizes = b.const("split_sizes", np.array([12, 16], np.int64))
    left, right = b.op_n("Split", [x, sizes], 2, axis=1)
    starts, ends, axes = (b.const(n, np.array([v], np.int64)) for n, v in (("s0", 4), ("s1", 12), ("s2", 1)))
    right = b.op("Slice", [right, starts, ends, axes])  # channels 16..24 of the concat
    x = b.op("Concat", [b.cbr(left, 12, 12, k=1, name="left"), right], axis=1)  # 20 channels
    x = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])  # 4x4 map
    h = b.op("Relu", [b.gemm(b.op("Flatten", [x], axis=1), 20 * 16, 32, name="fc1")])
    return b.finish(b.gemm(h, 32, 10, name="fc"), name="dense_net")


def se_net(seed: int = 0) -> onnx.ModelProto:
    """EfficientNet/MobileNetV3-style: SiLU, squeeze-and-excitation with 1x1 convs, a
    Linear-based SE (ReduceMean, Gemm, Reshape), HardSwish, and a Reshape-to-2D head."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, act="", name="stem")
    x = b.op("Mul", [x, b.op("Sigmoid", [x])])  # SiLU
    h = b.cbr(x, 16, 32, groups=16, act="HardSwish", name="dw")  # multiplier 2
    s = b.op("GlobalAveragePool", [h])
    s = b.op("Relu", [b.conv(s, 32, 8, k=1, name="se_reduce")])
    s = b.op("HardSigmoid", [b.conv(s, 8, 32, k=1, name="se_expand")], alpha=1 / 6, beta=0.5)
    h = b.op("Mul", [h, s])
    h = b.cbr(h, 32, 16, k=1, act="", name="project")
    x = b.op("Add", [x, h])
    y = b.cbr(x, 16, 24, act="Relu", name="conv2")
    axes = b.const("mean_axes", np.array([2, 3], np.int64))
    s = b.op("ReduceMean", [y, axes], keepdims=0)
    s = b.op("Sigmoid", [b.gemm(b.op("Relu", [b.gemm(s, 24, 6, name="se2_fc1")]), 6, 24, name="se2_fc2")])
    s = b.op("Reshape", [s, b.const("se2_shape", np.array([-1, 24, 1, 1], np.int64))])
    y = b.op("Mul", [y, s])
    pooled = b.op("ReduceMean", [y, axes], keepdims=1)
    flat = b.op("Reshape", [pooled, b.const("head_shape", np.array([-1, 24], np.int64))])
    return b.finish(b.gemm(flat, 24, 10, name="fc"), name="se_net", opset=18)


def mlp_net(seed: int = 0) -> onnx.ModelProto:
    """ConvNeXt-style: channels-last MatMul MLP with a decomposed GELU and a layer scale,
    behind a LayerNormalization (which blocks the residual stream)."""
    b = NetBuilder(seed)
    x = b.conv("input", 3, 16, k=4, stride=4, name="stem")
    t = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    t = b.op(
        "LayerNormalization",
        [t, b.const("ln.scale", np.ones(16, np.float32)), b.const("ln.bias", np.zeros(16, np.float32))],
        axis=-1,
    )
    w1 = b.const("mlp.fc1.weight", b.rng.normal(0, 0.25, (16, 64)).astype(np.float32))
    h = b.op(
        "Add",
        [
            b.op("MatMul", [t, w1], name="mlp_fc1"),
            b.const("mlp.fc1.bias", b.rng.normal(0, 0.1, 64).astype(np.float32)),
        ],
    )
    root2 = b.const("sqrt2", np.array(2**0.5, np.float32))
    one, half = b.const("one", np.array(1.0, np.float32)), b.const("half", np.array(0.5, np.float32))
    g = b.op("Mul", [b.op("Mul", [h, b.op("Add", [b.op("Erf", [b.op("Div", [h, root2])]), one])]), half])
    w2 = b.const("mlp.fc2.weight", b.rng.normal(0, 0.125, (64, 16)).astype(np.float32))
    y = b.op(
        "Add",
        [
            b.op("MatMul", [g, w2], name="mlp_fc2"),
            b.const("mlp.fc2.bias", b.rng.normal(0, 0.1, 16).astype(np.float32)),
        ],
    )
    y = b.op("Mul", [y, b.const("mlp.gamma", b.rng.uniform(0.5, 1.0, 16).astype(np.float32))])
    x = b.op("Add", [x, b.op("Transpose", [y], perm=[0, 3, 1, 2])])
    return b.finish(b.head(x, 16), name="mlp_net")


def misc_net(seed: int = 0) -> onnx.ModelProto:
    """Spatial Pad and Resize, a ReduceMean/Unsqueeze gate, a ConvTranspose producer and an
    InstanceNormalization."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, name="stem")
    x = b.op("Pad", [x, b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])  # 18x18
    x = b.op("Resize", [x, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    x = b.cbr(x, 16, 24, stride=2, name="down")  # 18x18
    gate = b.op("ReduceMean", [x], axes=[2, 3], keepdims=0)
    gate = b.op("Unsqueeze", [gate, b.const("gate_axes", np.array([2, 3], np.int64))])
    x = b.op("Mul", [x, b.op("Sigmoid", [gate])])
    w = b.const("up.weight", b.rng.normal(0, 0.2, (24, 12, 2, 2)).astype(np.float32))
    x = b.op(
        "ConvTranspose",
        [x, w, b.const("up.bias", b.rng.normal(0, 0.1, 12).astype(np.float32))],
        name="up",
        strides=[2, 2],
    )
    scale, shift = (
        b.const("in.scale", b.rng.uniform(0.5, 1.5, 12).astype(np.float32)),
        b.const("in.bias", np.zeros(12, np.float32)),
    )
    x = b.op("LeakyRelu", [b.op("InstanceNormalization", [x, scale, shift])], alpha=0.1)
    return b.finish(b.head(x, 12), name="misc_net")


def shuffle_net(seed: int = 0) -> onnx.ModelProto:
    """A channel shuffle (Reshape-Transpose-Reshape) and a conv that is also a graph output:
    the groups involved must be skipped with reasons."""
    b = NetBuilder(seed)
    x = b.cbr("input", 3, 16, name="stem")
    y = b.op("Reshape", [x, b.const("split_groups", np.array([0, 2, 8, SIZE, SIZE], np.int64))])
    y = b.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.op("Reshape", [y, b.const("merge_groups", np.array([0, 16, SIZE, SIZE], np.int64))])
    z = b.cbr(y, 16, 16, name="after_shuffle")
    side = b.conv(z, 16, 4, k=1, name="side_output")
    b.nodes.append(helper.make_node("Identity", [side], ["side"], name="side_identity"))
    return b.finish(b.head(z, 16), name="shuffle_net", extra_outputs=[("side", ["batch", 4, SIZE, SIZE])])


BUILDERS = {
    "residual": residual_net,
    "mobilenet": mobilenet_net,
    "dense": dense_net,
    "se": se_net,
    "mlp": mlp_net,
    "misc": misc_net,
    "shuffle": shuffle_net,
}

#: Roles of constants that produce a channel's value (zeroing them silences it).
_SOURCE_ROLES = ("producer-weight", "producer-bias", "norm-scale", "norm-bias", "operand:Add", "operand:Sub")


def silence_channels(model: onnx.ModelProto, units: Mapping[str, Sequence[int]]) -> None:
    """Zero the given units of the given groups at their source, in place.

    ``units`` is keyed like :func:`onnxshrink.prune.prune_channel_indices`. Weights,
    biases, norm scale and shift and added constants of the channels are zeroed, so the
    channels are exactly zero after any activation f with f(0) = 0 and contribute nothing
    to the layers that read them.
    """
    graph = analyze_channels(model)
    kept: dict[int, list[int]] = {}
    for key, drop in units.items():
        group = graph.find_group(key)
        if group is None:
            raise KeyError(key)
        kept[group.root] = [u for u in range(group.units) if u not in set(drop)]
    selection = Selection(graph.classes, graph.spaces, kept)
    index: GraphIndex = graph.index
    for edit in graph.edits:
        if not isinstance(edit, SliceConst) or edit.role not in _SOURCE_ROLES:
            continue
        kept_positions = selection.indices(edit.layout)
        if kept_positions is None:
            continue
        dropped = np.setdiff1d(np.arange(layout_length(edit.layout)), kept_positions)
        source = index.const_source(index.nodes[edit.node].input[edit.input])
        tensor = index.initializers[source]  # type: ignore[index]
        array = numpy_helper.to_array(tensor).copy()
        np.moveaxis(array, edit.axis, 0)[dropped] = 0
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
