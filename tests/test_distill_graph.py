"""TorchGraph: parity with onnxruntime, gradients, exact write-back, pruning masks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
import torch.nn.functional as F
from conftest import SAMPLES, make_external

from onnxshrink.distill import TorchGraph
from onnxshrink.errors import DataError, UnsupportedModelError
from onnxshrink.modelio import load_model
from onnxshrink.testing import conv_net, run_ort

SAMPLE_MODELS = ["plain_cnn", "resnet_mini", "mobilenet_mini"]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-12))


def digits(count: int) -> np.ndarray:
    path = SAMPLES / "digits_eval.npz"
    if not path.is_file():
        pytest.skip("sample data not built yet")
    with np.load(path) as npz:
        return np.ascontiguousarray(npz["input"][:count])


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_sample_models_match_onnxruntime(name: str) -> None:
    path = SAMPLES / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} not built yet")
    model, _ = load_model(path)
    feeds = {"input": digits(32)}
    graph = TorchGraph(model).eval()
    got, want = graph.predict(feeds)[0], run_ort(model, feeds)[0]
    assert relative_error(got, want) <= 1e-4
    assert np.array_equal(got.argmax(1), want.argmax(1))


def mixed_ops_model() -> onnx.ModelProto:
    """MatMul+Add (bias), LayerNorm, Gelu-by-Erf, Softmax, Reshape/Transpose/Concat/Slice, Resize."""
    rng = np.random.default_rng(3)
    inits = {
        "w1": rng.normal(0, 0.5, (6, 8)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "ln.s": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "ln.b": rng.normal(0, 0.1, 8).astype(np.float32),
        "half": np.float32(0.5),
        "one": np.float32(1.0),
        "sqrt2": np.float32(np.sqrt(2)),
        "shape": np.asarray([0, 4, 2, 4], np.int64),
        "starts": np.asarray([1], np.int64),
        "ends": np.asarray([4], np.int64),
        "axes": np.asarray([2], np.int64),
        "scales": np.asarray([1, 1, 2, 2], np.float32),
    }
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["mm"]),
        n("Add", ["mm", "b1"], ["lin"]),
        n("LayerNormalization", ["lin", "ln.s", "ln.b"], ["ln"], axis=-1),
        n("Div", ["ln", "sqrt2"], ["d"]),
        n("Erf", ["d"], ["e"]),
        n("Add", ["e", "one"], ["e1"]),
        n("Mul", ["ln", "e1"], ["g0"]),
        n("Mul", ["g0", "half"], ["gelu"]),
        n("Reshape", ["gelu", "shape"], ["r"]),
        n("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
        n("Slice", ["t", "starts", "ends", "axes"], ["s"]),
        n("Concat", ["t", "s"], ["c"], axis=2),
        n("Resize", ["c", "", "scales"], ["up"], mode="nearest"),
        n("Softmax", ["up"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    "build",
    [lambda: conv_net(channels=(3, 8, 16), size=12, seed=1), mixed_ops_model],
    ids=["conv_net", "mixed"],
)
def test_tiny_models_match_onnxruntime(build) -> None:
    model = build()
    shape = (3, 3, 12, 12) if model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3 else (3, 4, 6)
    feeds = {
        "input" if shape[1] == 3 else "x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    }
    assert relative_error(TorchGraph(model).predict(feeds)[0], run_ort(model, feeds)[0]) <= 1e-5


def test_weights_and_constants_are_told_apart() -> None:
    graph = TorchGraph(mixed_ops_model())
    trainable = {name for name, _ in graph.named_weights()}
    assert trainable == {"w1", "b1", "ln.s", "ln.b"}  # the scalars, shapes and scales are buffers
    assert all("." not in key for key in graph.weights)
    assert graph.onnx_names[graph._keys["ln.s"]] == "ln.s"


class HandWritten(torch.nn.Module):
    """conv_net written by hand in torch."""

    def __init__(self, inits: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.p = torch.nn.ParameterDict(
            {
                k.replace(".", "_"): torch.nn.Parameter(torch.from_numpy(v.copy()))
                for k, v in inits.items()
                if "mean" not in k and "var" not in k
            }
        )
        self.stats = {k: torch.from_numpy(v.copy()) for k, v in inits.items() if "mean" in k or "var" in k}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(2):
            x = F.conv2d(x, self.p[f"conv{i}_weight"], self.p[f"conv{i}_bias"], padding=1)
            x = F.batch_norm(
                x,
                self.stats[f"bn{i}.mean"],
                self.stats[f"bn{i}.var"],
                self.p[f"bn{i}_scale"],
                self.p[f"bn{i}_bias"],
                training=False,
            )
            x = F.relu(x)
        return F.linear(x.mean(dim=(2, 3)), self.p["fc_weight"], self.p["fc_bias"])


def test_gradients_match_a_hand_written_module() -> None:
    model = conv_net(channels=(3, 8, 16), size=12, seed=1)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    graph, reference = TorchGraph(model), HandWritten(inits)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32))
    weights = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 10)).astype(np.float32))
    (graph(x)[0] * weights).sum().backward()
    (reference(x) * weights).sum().backward()
    names = {name for name, _ in graph.named_weights()}
    assert names == {k for k in inits if "mean" not in k and "var" not in k}
    for name, param in graph.named_weights():
        expected = reference.p[name.replace(".", "_")].grad
        assert param.grad is not None and expected is not None
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_untrained_export_is_identical(name: str) -> None:
    path = SAMPLES / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path.name} not built yet")
    model, _ = load_model(path)
    exported = TorchGraph(model).export()
    assert exported.SerializeToString() == model.SerializeToString()
    feeds = {"input": digits(8)}
    np.testing.assert_array_equal(run_ort(exported, feeds)[0], run_ort(model, feeds)[0])


def test_export_writes_trained_values_and_keeps_the_template() -> None:
    model = conv_net(channels=(3, 4), size=8, seed=2)
    before = model.SerializeToString()
    graph = TorchGraph(model)
    with torch.no_grad():
        graph.weights[graph._keys["fc.weight"]].add_(1.0)
    exported = graph.export()
    assert model.SerializeToString() == before, "export must not touch the original proto"
    new = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(new["fc.weight"], old["fc.weight"] + 1.0)
    np.testing.assert_array_equal(new["conv0.weight"], old["conv0.weight"])
    feeds = {"input": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_allclose(run_ort(exported, feeds)[0], graph.predict(feeds)[0], rtol=1e-5, atol=1e-5)


def test_weights_held_in_constant_nodes_are_trained_and_written_back() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    tg = TorchGraph(model)
    assert [name for name, _ in tg.named_weights()] == ["w"]
    with torch.no_grad():
        tg.weights[tg._keys["w"]].mul_(2)
    out = tg.export()
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.node[0].attribute[0].t), 2 * w)


def test_pruned_weights_stay_zero_through_training() -> None:
    model = conv_net(channels=(3, 8), size=8, seed=3)
    for t in model.graph.initializer:
        if t.name == "conv0.weight":
            w = numpy_helper.to_array(t).copy()
            w[np.abs(w) < np.median(np.abs(w))] = 0.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    zeros = w == 0
    graph = TorchGraph(model)
    assert set(graph.masks._buffers) == {graph._keys["conv0.weight"]}  # biases and dense weights: no mask
    optimizer = torch.optim.AdamW(graph.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        (graph(x)[0] ** 2).sum().backward()
        assert torch.all(graph.weights[graph._keys["conv0.weight"]].grad[torch.from_numpy(zeros)] == 0)
        optimizer.step()
    trained = {t.name: numpy_helper.to_array(t) for t in graph.export().graph.initializer}["conv0.weight"]
    assert np.all(trained[zeros] == 0.0)
    assert not np.allclose(trained[~zeros], w[~zeros])


def test_keep_sparsity_off_and_frozen() -> None:
    model = conv_net(channels=(3, 4), size=8, seed=4)
    graph = TorchGraph(model, keep_sparsity=False, frozen={"fc.weight"})
    assert not graph.masks._buffers
    assert "fc.weight" not in {n for n, _ in graph.named_weights()}


def test_inputs_by_position_name_and_numpy() -> None:
    model = conv_net(channels=(3, 4), size=8, seed=5)
    graph = TorchGraph(model)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a = graph(torch.from_numpy(x))[0]
    b = graph(input=x)[0]
    assert isinstance(graph(x), tuple) and torch.equal(a, b)
    with pytest.raises(DataError, match="missing model input"):
        graph.run({})


def test_external_data_must_be_loaded_first() -> None:
    model = conv_net(channels=(3, 4), size=8, seed=6)
    make_external(model.graph.initializer[0], "weights.bin")
    with pytest.raises(UnsupportedModelError, match="external data"):
        TorchGraph(model)


def test_outputs_have_the_declared_type_whatever_the_compute_type() -> None:
    model = conv_net(channels=(3, 4), size=8, seed=7)
    x = torch.randn(1, 3, 8, 8)
    single = TorchGraph(model)(x)[0]
    graph = TorchGraph(model).to(torch.float64)
    double = graph(x.double())[0]
    assert double.dtype == torch.float32 and graph.device.type == "cpu"
    torch.testing.assert_close(double, single, rtol=1e-5, atol=1e-6)
