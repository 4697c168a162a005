"""A third exporter: tf2onnx from a small Keras CNN (NHWC input, Transpose, opset 15).

The fixture and Keras's own outputs come from tests/data/exporters/make_tf2onnx.py, run in a
separate venv with TensorFlow (not a dependency of onnxshrink, and not run in CI).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxshrink.cli import main
from onnxshrink.data import Sample
from onnxshrink.modelio import load_model, save_model
from onnxshrink.passes.prepare import prepare
from onnxshrink.shrink import ShrinkOptions, shrink
from onnxshrink.testing import run_ort
from onnxshrink.verify import sqnr_db

EXPORTERS = Path(__file__).resolve().parent / "data" / "exporters"
MODEL = EXPORTERS / "tf2onnx_keras.onnx"
#: int8 against Keras's fp32 outputs on the fixture's inputs: measured 38.9-39.9 dB with
#: calibration seeds 7-9 (64 random samples, default Int8Config); 30 dB leaves room for
#: kernel and calibration changes and still catches a broken NHWC/Transpose quantization.
INT8_MIN_SQNR_DB = 30.0


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    data = np.load(EXPORTERS / "tf2onnx_keras_io.npz")
    return {k: data[k] for k in data.files}


def test_tf2onnx_model_loads_and_matches_keras(io, tmp_path):
    model, info = load_model(MODEL)
    assert model.producer_name == "tf2onnx"
    assert next(o.version for o in model.opset_import if o.domain == "") == 15
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [16, 16, 3]  # NHWC, dynamic batch
    first = model.graph.node[0]
    assert first.op_type == "Transpose" and list(first.attribute[0].ints) == [0, 3, 1, 2]
    assert info.external_bytes == 0
    np.testing.assert_allclose(run_ort(model, {"image": io["image"]})[0], io["expected"], rtol=1e-5, atol=1e-5)
    out = save_model(model, tmp_path / "rt.onnx")
    np.testing.assert_allclose(run_ort(str(out), {"image": io["image"]})[0], io["expected"], rtol=1e-5, atol=1e-5)


def test_inspect_reads_the_nhwc_model(capsys):
    code = main(["inspect", str(MODEL), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["inputs"][0]["name"] == "image" and doc["inputs"][0]["shape"][1:] == [16, 16, 3]
    assert doc["outputs"][0]["name"] == "Identity:0"
    assert doc["op_types"]["Conv"] == 4 and doc["op_types"]["Transpose"] == 1
    assert doc["parameters"] == 2888  # Keras's 2,962 less the BatchNorm that tf2onnx folded into conv1
    assert doc["macs"]["total"] > 100_000


def test_prepare_is_lossless_against_keras(io):
    model, _ = load_model(MODEL)
    prepared, report = prepare(model, [Sample({"image": io["image"][:2]})])
    assert all(s["applied"] for s in report.steps if s["step"].startswith("fold"))
    assert report.nodes_after <= report.nodes_before
    assert [o.domain for o in prepared.opset_import] == [""]  # the unused ai.onnx.ml import is gone
    onnx.checker.check_model(prepared, full_check=True)
    got = run_ort(prepared, {"image": io["image"]})[0]  # all four samples, two of them unseen
    np.testing.assert_allclose(got, io["expected"], rtol=1e-4, atol=1e-5)


def test_shrink_int8_keeps_fidelity_against_keras(io, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(7).standard_normal((64, 16, 16, 3)).astype(np.float32))
    outcome = shrink(MODEL, tmp_path / "int8.onnx", ShrinkOptions(calibration=str(calib), measure_latency=False))
    quantized, _ = load_model(tmp_path / "int8.onnx")
    dq_outputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4 and all(n.input[0] in dq_outputs and n.input[1] in dq_outputs for n in convs)
    int8 = {t.name for t in quantized.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    by_output = {n.output[0]: n for n in quantized.graph.node}
    assert all(by_output[n.input[1]].input[0] in int8 for n in convs)  # weights stored as int8
    assert outcome.steps == ["quantize.int8"] and outcome.int8.quantized_nodes >= 4
    got = run_ort(quantized, {"image": io["image"]})[0]
    assert sqnr_db(io["expected"], got) >= INT8_MIN_SQNR_DB
