"""Tiny models built in code, and comparison helpers; used by the tests and handy for users."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.verify import sqnr_db  # noqa: F401 - re-exported for tests


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def conv_net(
    *,
    channels: Sequence[int] = (3, 8, 16),
    classes: int = 10,
    size: int = 16,
    seed: int = 0,
    opset: int = 17,
    batch: str | int = "batch",
) -> onnx.ModelProto:
    """Conv-BN-ReLU blocks, global average pool, Gemm: a small, valid CNN with random weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = "input"
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        w = rng.normal(0, (2.0 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32)
        inits += [
            _init(f"conv{i}.weight", w),
            _init(f"conv{i}.bias", rng.normal(0, 0.1, cout).astype(np.float32)),
            _init(f"bn{i}.scale", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
            _init(f"bn{i}.bias", rng.normal(0, 0.1, cout).astype(np.float32)),
            _init(f"bn{i}.mean", rng.normal(0, 0.1, cout).astype(np.float32)),
            _init(f"bn{i}.var", rng.uniform(0.5, 1.5, cout).astype(np.float32)),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"],
                [f"b{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    inits += [
        _init("fc.weight", rng.normal(0, 0.3, (classes, channels[-1])).astype(np.float32)),
        _init("fc.bias", rng.normal(0, 0.1, classes).astype(np.float32)),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels[0], size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnxshrink.testing")
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model once on onnxruntime's CPU provider."""
    from onnxshrink.runtime import make_session

    session = make_session(model, threads=1)
    return session.run(None, feeds)


def fragile_head_net(*, seed: int = 0, size: int = 8, classes: int = 10, outlier_gain: float = 2000.0) -> onnx.ModelProto:
    """A CNN whose feature map has one channel with a huge range (as in detection heads).

    Channel 0 of the features is ``outlier_gain`` times larger than the rest, and the head
    weights scale it back down, so fp32 outputs are ordinary; quantizing that feature map
    with one scale per tensor wipes out every other channel.
    """
    rng = np.random.default_rng(seed)
    c = 16
    w1 = rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32)
    w1[0] *= outlier_gain
    w2 = rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32)
    w2[:, 0] /= outlier_gain
    fc = rng.normal(0, 0.5, (classes, c * size * size)).astype(np.float32)
    inits = [
        _init("features.weight", w1),
        _init("features.bias", np.zeros(c, np.float32)),
        _init("head.weight", w2),
        _init("head.bias", rng.normal(0, 0.1, c).astype(np.float32)),
        _init("fc.weight", fc),
        _init("fc.bias", np.zeros(classes, np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "features.weight", "features.bias"], ["f"], name="features", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["fr"], name="features_relu"),
        helper.make_node("Conv", ["fr", "head.weight", "head.bias"], ["h"], name="head"),
        helper.make_node("Relu", ["h"], ["hr"], name="head_relu"),
        helper.make_node("Flatten", ["hr"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile_head_net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxshrink.testing")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model
