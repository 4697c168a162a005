"""QDQ students (onnxruntime quantize_static): fake-quant training and QDQ write-back."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
quantization = pytest.importorskip("onnxruntime.quantization")

from conftest import SAMPLES, write_model

from onnxshrink.distill import TorchGraph
from onnxshrink.modelio import load_model
from onnxshrink.runtime import make_session, run
from onnxshrink.testing import conv_net


class _Reader(quantization.CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"input": batch}


def quantize(
    model: onnx.ModelProto, tmp_path: Path, calib: np.ndarray, *, per_channel: bool = True
) -> onnx.ModelProto:
    src = write_model(model, tmp_path / "fp32.onnx")
    dst = tmp_path / "int8.onnx"
    quantization.quantize_static(
        str(src),
        str(dst),
        _Reader([calib[i : i + 8] for i in range(0, len(calib), 8)]),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    return load_model(dst)[0]


def tiny_int8(tmp_path: Path, *, per_channel: bool = True) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 3, 12, 12)).astype(np.float32)
    test = rng.standard_normal((16, 3, 12, 12)).astype(np.float32)
    return quantize(
        conv_net(channels=(3, 8, 16), size=12, seed=1), tmp_path, calib, per_channel=per_channel
    ), test


def quanta_error(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference in output quanta (int8 outputs: max|y| / 127 per quantum)."""
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) / 127))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_qdq_graph_matches_onnxruntime(tmp_path: Path, per_channel: bool) -> None:
    model, x = tiny_int8(tmp_path, per_channel=per_channel)
    graph = TorchGraph(model)
    assert len(graph.quantized) > 0 and set(graph.quantized) == {n for n, _ in graph.named_weights()}
    got = graph.predict({"input": x})[0]
    for level in ("disable", "all"):  # float Q/DQ reference, and the fused int8 kernels
        want = run(make_session(model, optimization=level), {"input": x})[0]
        assert quanta_error(got, want) <= 2.0, level
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9


def test_qdq_sample_model_matches_onnxruntime(tmp_path: Path) -> None:
    path = SAMPLES / "resnet_mini.onnx"
    if not path.is_file() or not (SAMPLES / "digits_calib.npz").is_file():
        pytest.skip("sample model not built yet")
    with np.load(SAMPLES / "digits_calib.npz") as npz:
        data = npz["input"][:96]
    model = quantize(load_model(path)[0], tmp_path, data[:64])
    got = TorchGraph(model).predict({"input": data[64:]})[0]
    want = run(make_session(model), {"input": data[64:]})[0]
    assert quanta_error(got, want) <= 2.0
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95


def test_untrained_qdq_export_is_identical(tmp_path: Path) -> None:
    model, _ = tiny_int8(tmp_path)
    assert TorchGraph(model).export().SerializeToString() == model.SerializeToString()


def train_a_little(graph: TorchGraph, x: np.ndarray, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(graph.parameters(), lr=0.02)
    target = torch.randn(len(x), 10)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((graph(input=x)[0] - target) ** 2).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in graph.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in graph.parameters()), "STE must pass gradients"
        optimizer.step()


def test_trained_qdq_export_is_valid_qdq(tmp_path: Path) -> None:
    model, x = tiny_int8(tmp_path)
    graph = TorchGraph(model)
    train_a_little(graph, x)
    out = graph.export()
    onnx.checker.check_model(out, full_check=True)
    assert collections.Counter(n.op_type for n in out.graph.node) == collections.Counter(
        n.op_type for n in model.graph.node
    )
    tensors = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = [q for q in graph.quantized.values() if q.policy == "symmetric"]
    biases = [q for q in graph.quantized.values() if q.policy == "bias"]
    assert weights and biases
    assert any(not np.array_equal(tensors[qw.name], old[qw.name]) for qw in weights), (
        "training changed nothing"
    )
    for qw in weights:
        q, scale = tensors[qw.name], tensors[qw.scale_name]
        assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == old[qw.scale_name].shape
        assert not np.any(tensors[qw.zero_point_name])
        per_channel = (
            np.abs(q.astype(np.int32)).reshape(q.shape[0], -1).max(axis=1)
            if scale.size > 1
            else np.abs(q).max()
        )
        assert np.all(per_channel == 127), "symmetric scales: the largest weight of each channel maps to 127"
    for qb in biases:
        assert tensors[qb.name].dtype == np.int32
        expected = tensors[qb.input_scale].astype(np.float64) * tensors[qb.partner.scale_name].astype(
            np.float64
        )
        np.testing.assert_allclose(
            tensors[qb.scale_name], expected.reshape(tensors[qb.scale_name].shape), rtol=1e-6
        )
    # onnxruntime runs the written model as the torch graph computed it
    got = graph.predict({"input": x})[0]
    want = run(make_session(out, optimization="disable"), {"input": x})[0]
    assert quanta_error(got, want) <= 2.0


def test_pruned_then_quantized_weights_keep_their_zeros(tmp_path: Path) -> None:
    fp32 = conv_net(channels=(3, 8, 16), size=12, seed=1)
    for t in fp32.graph.initializer:
        if t.name == "conv1.weight":
            w = numpy_helper.to_array(t).copy()
            w[np.abs(w) < np.quantile(np.abs(w), 0.5)] = 0.0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    calib = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    model = quantize(fp32, tmp_path, calib)
    graph = TorchGraph(model)
    name = next(q.name for q in graph.quantized.values() if q.name.startswith("conv1.weight"))
    assert graph._keys[name] in graph.masks._buffers
    zeros = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)) == 0
    train_a_little(graph, calib)
    trained = numpy_helper.to_array(next(t for t in graph.export().graph.initializer if t.name == name))
    assert np.all(trained[zeros] == 0) and np.mean(zeros) >= 0.5
