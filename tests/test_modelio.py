"""Safe loading and atomic saving, on real files, checked with real onnxruntime sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import CANARY, make_external, write_model
from onnxshrink.errors import ModelLoadError, ModelSaveError, UnsafeModelError, UnsupportedModelError
from onnxshrink.modelio import has_external_data, load_model, save_model
from onnxshrink.testing import conv_net, run_ort


def test_round_trip_keeps_outputs(tmp_path, small_model, feeds):
    src = write_model(small_model, tmp_path / "m.onnx")
    model, info = load_model(src)
    assert info.file_bytes == src.stat().st_size
    out = save_model(model, tmp_path / "out.onnx", input_path=src)
    np.testing.assert_array_equal(run_ort(str(out), feeds)[0], run_ort(small_model, feeds)[0])


def test_external_data_round_trip(tmp_path, small_model, feeds):
    src = write_model(small_model, tmp_path / "m.onnx")
    model, _ = load_model(src)
    out = save_model(model, tmp_path / "ext" / "model.onnx" if False else tmp_path / "model.onnx", external_data=True)
    data_files = sorted(p.name for p in tmp_path.glob("model.onnx.*.data"))
    assert len(data_files) == 1
    assert not has_external_data(model), "saving must not leave the caller's model external"
    # onnxruntime reads the pair directly, and so do we (lazily, then fully).
    np.testing.assert_array_equal(run_ort(str(out), feeds)[0], run_ort(small_model, feeds)[0])
    lazy, info = load_model(out, load_weights=False)
    assert has_external_data(lazy) and info.external_bytes > 0
    full, _ = load_model(out)
    np.testing.assert_array_equal(run_ort(full, feeds)[0], run_ort(small_model, feeds)[0])
    # Saving again over the same output replaces the pair and removes the old data file.
    full.graph.initializer[0].raw_data = np.zeros_like(numpy_helper.to_array(full.graph.initializer[0])).tobytes()
    save_model(full, out, external_data=True)
    assert len(list(tmp_path.glob("model.onnx.*.data"))) == 1
    assert not [p for p in tmp_path.iterdir() if "onnxshrink-tmp" in p.name]


def test_constant_node_weights_are_lifted(tmp_path, small_model, feeds):
    model = onnx.ModelProto()
    model.CopyFrom(small_model)
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    src = write_model(model, tmp_path / "paddle_style.onnx")
    loaded, _ = load_model(src)
    assert not any(n.op_type == "Constant" for n in loaded.graph.node)
    assert {t.name for t in loaded.graph.initializer} == {t.name for t in small_model.graph.initializer}
    np.testing.assert_allclose(run_ort(loaded, feeds)[0], run_ort(small_model, feeds)[0], rtol=0, atol=0)


def test_initializers_listed_as_inputs_are_dropped(tmp_path, small_model):
    model = onnx.ModelProto()
    model.CopyFrom(small_model)
    model.ir_version = 3
    model.opset_import[0].version = 11
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    src = write_model(model, tmp_path / "old.onnx")
    loaded, _ = load_model(src)
    assert [i.name for i in loaded.graph.input] == ["input"]


# ----------------------------------------------------------------- refusals of the model path


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        load_model(tmp_path)


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model(fifo)


def test_device_is_refused():
    with pytest.raises(ModelLoadError, match="not a regular file"):
        load_model("/dev/zero")


@pytest.mark.parametrize("payload, message", [(b"", "empty"), (b"\xff\xfe garbage \x00" * 10, "not a valid ONNX")])
def test_malformed_files(tmp_path, payload, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


@pytest.mark.parametrize("opset, message", [(99, "newer than"), (7, "older than")])
def test_opset_range(tmp_path, small_model, opset, message):
    small_model.opset_import[0].version = opset
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(write_model(small_model, tmp_path / "m.onnx"))


def test_declared_size_must_match_stored_bytes(tmp_path, small_model):
    # 200 bytes of file that declares a 2**40-element weight must not allocate anything.
    w = small_model.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([2**20, 2**20])
    with pytest.raises(UnsafeModelError, match="declares shape"):
        load_model(write_model(small_model, tmp_path / "m.onnx"))


def test_negative_dims(tmp_path, small_model):
    small_model.graph.initializer[0].dims[0] = -8
    with pytest.raises(UnsafeModelError, match="negative dimension"):
        load_model(write_model(small_model, tmp_path / "m.onnx"))


def test_checker_failure_is_one_line(tmp_path, small_model):
    small_model.graph.node[0].input[0] = "does_not_exist"
    with pytest.raises(ModelLoadError, match="checker") as info:
        load_model(write_model(small_model, tmp_path / "m.onnx"))
    assert "\n" not in info.value.one_line()


# ----------------------------------------------------------------- refusals of external data


def _external_model(tmp_path: Path, small_model: onnx.ModelProto, location: str, **kwargs) -> Path:
    folder = tmp_path / "model_dir"
    folder.mkdir(exist_ok=True)
    make_external(small_model.graph.initializer[0], location, **kwargs)
    return write_model(small_model, folder / "model.onnx")


def _assert_refused(path: Path, message: str) -> None:
    with pytest.raises((UnsafeModelError, ModelLoadError), match=message) as info:
        load_model(path)
    assert CANARY.decode() not in info.value.one_line()


def test_absolute_location(tmp_path, small_model, canary):
    _assert_refused(_external_model(tmp_path, small_model, str(canary)), "absolute")


def test_dotdot_location(tmp_path, small_model, canary):
    _assert_refused(_external_model(tmp_path, small_model, "../outside/secret.bin"), "outside the model folder")


def test_symlinked_data_file(tmp_path, small_model, canary):
    path = _external_model(tmp_path, small_model, "weights.bin")
    (path.parent / "weights.bin").symlink_to(canary)
    _assert_refused(path, "symbolic link")


def test_symlinked_directory_component(tmp_path, small_model, canary):
    path = _external_model(tmp_path, small_model, "sub/secret.bin")
    (path.parent / "sub").symlink_to(canary.parent, target_is_directory=True)
    _assert_refused(path, "symbolic link")


def test_hard_linked_data_file(tmp_path, small_model, canary):
    path = _external_model(tmp_path, small_model, "weights.bin")
    os.link(canary, path.parent / "weights.bin")
    _assert_refused(path, "hard link")


def test_data_path_is_a_directory(tmp_path, small_model):
    path = _external_model(tmp_path, small_model, "weights.bin")
    (path.parent / "weights.bin").mkdir()
    _assert_refused(path, "not a regular file")


def test_data_path_is_a_fifo(tmp_path, small_model):
    path = _external_model(tmp_path, small_model, "weights.bin")
    os.mkfifo(path.parent / "weights.bin")
    _assert_refused(path, "not a regular file")


def test_range_beyond_file(tmp_path, small_model):
    nbytes = len(small_model.graph.initializer[0].raw_data)
    path = _external_model(tmp_path, small_model, "weights.bin", offset=64)
    (path.parent / "weights.bin").write_bytes(b"\0" * nbytes)
    _assert_refused(path, "exceeds its size")


def test_length_must_match_shape(tmp_path, small_model):
    path = _external_model(tmp_path, small_model, "weights.bin", length=8)
    (path.parent / "weights.bin").write_bytes(b"\0" * 4096)
    _assert_refused(path, "external length")


def test_missing_data_file(tmp_path, small_model):
    _assert_refused(_external_model(tmp_path, small_model, "weights.bin"), "not found")


# ----------------------------------------------------------------- saving


def test_refuses_to_overwrite_input(tmp_path, small_model):
    src = write_model(small_model, tmp_path / "m.onnx")
    before = src.read_bytes()
    model, _ = load_model(src)
    with pytest.raises(ModelSaveError, match="overwrite the input"):
        save_model(model, src, input_path=src)
    hard = tmp_path / "same_inode.onnx"
    os.link(src, hard)
    with pytest.raises(ModelSaveError, match="overwrite the input"):
        save_model(model, hard, input_path=src)
    assert src.read_bytes() == before


def test_refuses_symlink_output(tmp_path, small_model, canary):
    before = canary.read_bytes()
    link = tmp_path / "out.onnx"
    link.symlink_to(canary)
    with pytest.raises(ModelSaveError, match="symbolic link"):
        save_model(small_model, link)
    assert canary.read_bytes() == before


def test_missing_output_folder(tmp_path, small_model):
    with pytest.raises(ModelSaveError, match="folder does not exist"):
        save_model(small_model, tmp_path / "no" / "out.onnx")


def test_failed_write_keeps_previous_output(tmp_path, small_model):
    """A write that hits the file-size limit half-way leaves the old output and no temporaries."""
    out = tmp_path / "out.onnx"
    save_model(conv_net(seed=5), out)
    previous = out.read_bytes()
    src = write_model(conv_net(channels=(3, 64, 128), seed=6), tmp_path / "big.onnx")
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from onnxshrink.modelio import load_model, save_model\n"
        "from onnxshrink.errors import ModelSaveError\n"
        f"m, _ = load_model({str(src)!r})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        f"try:\n    save_model(m, {str(out)!r})\n"
        "except ModelSaveError as e:\n    print(e.one_line()); sys.exit(7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "cannot write" in proc.stdout
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "out.onnx"]


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path, small_model):
    stale = tmp_path / ".out.onnx.abc.onnxshrink-tmp-999999999-model"
    stale.write_bytes(b"half a model")
    save_model(small_model, tmp_path / "out.onnx")
    assert not stale.exists()


# ----------------------------------------------------------------- models from real exporters

EXPORTERS = Path(__file__).resolve().parent / "data" / "exporters"


@pytest.mark.parametrize(
    "model_file, io_file, lifted",
    [
        ("legacy_opset11.onnx", "legacy_opset11_io.npz", False),  # torch TorchScript exporter, opset 11
        ("dynamo_external/model.onnx", "dynamo_external_io.npz", False),  # torch dynamo, opset 18, .data file
        ("constant_weights.onnx", "constant_weights_io.npz", True),  # weights as Constant nodes (Paddle-style)
    ],
)
def test_models_from_exporters_load_and_match_torch(tmp_path, model_file, io_file, lifted):
    model, info = load_model(EXPORTERS / model_file)
    io = np.load(EXPORTERS / io_file)
    feeds = {k: io[k] for k in io.files if k != "expected"}
    np.testing.assert_allclose(run_ort(model, feeds)[0], io["expected"], rtol=1e-5, atol=1e-5)
    assert not any(n.op_type == "Constant" for n in model.graph.node) or not lifted
    if lifted:
        assert len(model.graph.initializer) >= 6
    if "external" in model_file:
        assert info.external_bytes > 0
    # Round trip through our writer, inline and external.
    for external in (False, True):
        out = save_model(model, tmp_path / f"rt_{external}.onnx", external_data=external)
        np.testing.assert_allclose(run_ort(str(out), feeds)[0], io["expected"], rtol=1e-5, atol=1e-5)


def test_declared_minus_one_dims_read_as_unknown(tmp_path):
    """keras2onnx-era files declare unknown dims as -1; onnxruntime runs them, so do we."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])],
    )  # fmt: skip
    path = tmp_path / "minus_one.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    before = path.read_bytes()
    model, _ = load_model(path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim.HasField("dim_value") and model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 4
    assert path.read_bytes() == before
    x = np.array([[-1.0, 2.0, -3.0, 4.0]] * 3, np.float32)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], np.maximum(x, 0))


def _one_node(node: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "hi")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize(
    "node, refused",
    [
        (helper.make_node("Sum", ["x", "x", ""], ["y"]), "a Sum node leaves its required input 2 empty"),
        (helper.make_node("Add", ["", "x"], ["y"], name="add0"), "'add0' (Add) leaves its required input 0 empty"),
        (helper.make_node("Clip", ["x", "", "hi"], ["y"]), None),  # Clip's min is optional
    ],
)
def test_empty_required_input_is_refused(tmp_path, node, refused):
    """onnxruntime segfaults on the first run of Sum(x, x, ""); the checker lets it through."""
    path = write_model(_one_node(node), tmp_path / "m.onnx")
    if refused is None:
        load_model(path)
        return
    with pytest.raises(ModelLoadError, match=refused.replace("(", r"\(").replace(")", r"\)")) as info:
        load_model(path)
    assert info.value.path == str(path)


def test_empty_tensor_with_impossible_shape_is_refused(tmp_path):
    """[2**63 - 1, 0] stores no bytes, yet numpy cannot make an array of that shape (fuzzing)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("e", TensorProto.INT8, None)],
        [helper.make_tensor("e", TensorProto.INT8, [2**63 - 1, 0], b"", raw=True)],
    )
    path = write_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(UnsafeModelError, match="beyond what any array can hold"):
        load_model(path)
