"""The bad-input corpus: hostile or broken files, each built on the fly in a scratch folder.

Every :class:`Case` says how its files are built, which command runs on them, and the one
line and exit code the command must answer with. Nothing binary is committed: each builder
writes a tiny model (or a not-a-model) from code, deterministically.

Scratch layout (see :class:`Layout`)::

    root/models/   the model under test and its external data (the "model folder")
    root/data/     calibration / training data
    root/out/      where outputs go
    root/outside/  secret.bin, a canary that no case may ever leak
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.testing import conv_net

CANARY = b"CANARY-e41b77-BAD-INPUT-CORPUS"
EXIT_BAD_INPUT, EXIT_USAGE = 1, 2


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def canary(self) -> Path:
        return self.root / "outside" / "secret.bin"

    @property
    def pickle_marker(self) -> Path:
        return self.root / "outside" / "UNPICKLED"

    def create(self) -> None:
        for folder in (self.models, self.data, self.out, self.canary.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.canary.write_bytes(CANARY * 64)


@dataclass
class Built:
    """What a builder made: the paths the command gets, and the file the error must name."""

    model: Path
    calib: Path | str | None = None
    output: Path | None = None
    names: Path | str | None = None  # default: the model
    extra: list[str] = field(default_factory=list)
    teacher: Path | None = None


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # not-a-model | external-data | graph | numeric | data | output
    command: str  # inspect | int8 | prune | magnitude | bench | distill
    message: str  # substring of the single error line
    exit_code: int
    build: Callable[[Layout], Built]
    isolate: bool = False  # run as a subprocess: the model's graph could hang or eat memory


def argv(case: Case, built: Built, lay: Layout) -> list[str]:
    """The command line that runs ``case`` on what was built."""
    model = str(built.model)
    out = str(built.output or lay.out / "result.onnx")
    calib = str(built.calib if built.calib is not None else _calib(lay))
    common = ["--no-timing"]
    commands = {
        "inspect": ["inspect", model],
        "int8": ["shrink", model, "-o", out, "--calib", calib, *common],
        "prune": ["shrink", model, "-o", out, "--quantize", "none", "--prune-channels", "0.5", "--calib", calib, *common],
        "magnitude": ["shrink", model, "-o", out, "--quantize", "none", "--prune-magnitude", "0.5", "--calib", calib, *common],
        "bench": ["bench", model, "--runs", "3", "--warmup", "0", "--min-time", "0", "--no-memory", "-q"]
        + (["--data", calib] if built.calib is not None else []),
        "distill": ["distill", "--teacher", str(built.teacher or model), "--student", model, "--data", calib, "-o", out, "--epochs", "1"],
    }
    return commands[case.command] + built.extra


# --------------------------------------------------------------------------- building blocks


def base_model(*, seed: int = 1) -> onnx.ModelProto:
    """A small CNN every command accepts: 3->4->8 channels, 8x8 input, 10 classes."""
    return conv_net(channels=(3, 4, 8), size=8, seed=seed)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _good(lay: Layout, name: str = "model.onnx") -> Path:
    return save(base_model(), lay.models / name)


def _calib(lay: Layout, arrays: dict[str, np.ndarray] | None = None, name: str = "calib.npz") -> Path:
    path = lay.data / name
    if not path.exists() or arrays is not None:
        if arrays is None:
            arrays = {"input": np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)}
        np.savez(path, **arrays)
    return path


def _external(tensor: TensorProto, location: str, *, offset: int | str = 0, length: int | str | None = None) -> None:
    nbytes = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes if length is None else length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _with_external(lay: Layout, location: str, **kwargs: int | str) -> tuple[Path, bytes]:
    """The base model with its first weight moved to external ``location``; returns its bytes."""
    model = base_model()
    weight = model.graph.initializer[0]
    data = weight.raw_data
    _external(weight, location, **kwargs)
    return save(model, lay.models / "model.onnx"), data


def _set_weight(model: onnx.ModelProto, name: str, fn: Callable[[np.ndarray], None]) -> onnx.ModelProto:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            arr = numpy_helper.to_array(t).copy()
            fn(arr)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
    return model


def _tiny_graph(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, out_shape: list[int] | None = None, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "trap",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _tiny_calib(lay: Layout) -> Path:
    return _calib(lay, {"input": np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)}, "tiny.npz")


# --------------------------------------------------------------------------- not a model


def b_empty(lay: Layout) -> Built:
    (lay.models / "model.onnx").write_bytes(b"")
    return Built(lay.models / "model.onnx")


def b_truncated(lay: Layout) -> Built:
    blob = base_model().SerializeToString()
    (lay.models / "model.onnx").write_bytes(blob[: len(blob) // 2])
    return Built(lay.models / "model.onnx")


def b_random_bytes(lay: Layout) -> Built:
    (lay.models / "model.onnx").write_bytes(np.random.default_rng(7).bytes(4096))
    return Built(lay.models / "model.onnx")


def b_text(lay: Layout) -> Built:
    (lay.models / "model.onnx").write_text("this is a README, not a model\n" * 20)
    return Built(lay.models / "model.onnx")


def b_directory(lay: Layout) -> Built:
    (lay.models / "model.onnx").mkdir()
    return Built(lay.models / "model.onnx")


def b_fifo(lay: Layout) -> Built:
    os.mkfifo(lay.models / "model.onnx")
    return Built(lay.models / "model.onnx")


def b_char_device(lay: Layout) -> Built:
    return Built(Path("/dev/zero"))


def b_symlink_outside(lay: Layout) -> Built:
    (lay.models / "model.onnx").symlink_to(lay.canary)
    return Built(lay.models / "model.onnx")


def b_missing(lay: Layout) -> Built:
    return Built(lay.models / "nope.onnx")


def b_no_graph(lay: Layout) -> Built:
    model = onnx.ModelProto(ir_version=10, producer_name="x")
    model.opset_import.add(domain="", version=17)
    return Built(save(model, lay.models / "model.onnx"))


def b_huge_dims(lay: Layout) -> Built:
    model = base_model()
    w = model.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([2**20, 2**20])
    return Built(save(model, lay.models / "model.onnx"))


def b_negative_dims(lay: Layout) -> Built:
    model = base_model()
    model.graph.initializer[0].dims[0] = -4
    return Built(save(model, lay.models / "model.onnx"))


def b_huge_input_dims(lay: Layout) -> Built:
    """A graph input declared [1, 2**40]: random feeds for it would need 4 TiB."""
    model = _tiny_graph([helper.make_node("Relu", ["input"], ["output"])], [], out_shape=[1, 4])
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40
    return Built(save(model, lay.models / "model.onnx"), calib="random")


# --------------------------------------------------------------------------- external data


def b_ext_absolute(lay: Layout) -> Built:
    return Built(_with_external(lay, str(lay.canary))[0])


def b_ext_dotdot(lay: Layout) -> Built:
    return Built(_with_external(lay, "../outside/secret.bin")[0])


def b_ext_symlink(lay: Layout) -> Built:
    path, _ = _with_external(lay, "weights.bin")
    (lay.models / "weights.bin").symlink_to(lay.canary)
    return Built(path)


def b_ext_hardlink(lay: Layout) -> Built:
    path, _ = _with_external(lay, "weights.bin")
    os.link(lay.canary, lay.models / "weights.bin")
    return Built(path)


def b_ext_offset_out_of_range(lay: Layout) -> Built:
    path, data = _with_external(lay, "weights.bin", offset=4096)
    (lay.models / "weights.bin").write_bytes(data)
    return Built(path)


def b_ext_length_mismatch(lay: Layout) -> Built:
    path, data = _with_external(lay, "weights.bin", length=16)
    (lay.models / "weights.bin").write_bytes(data)
    return Built(path)


def b_ext_negative_offset(lay: Layout) -> Built:
    path, data = _with_external(lay, "weights.bin", offset=-64)
    (lay.models / "weights.bin").write_bytes(data)
    return Built(path)


def b_ext_non_numeric(lay: Layout) -> Built:
    path, data = _with_external(lay, "weights.bin", offset="0x10")
    (lay.models / "weights.bin").write_bytes(data)
    return Built(path)


def b_ext_fifo(lay: Layout) -> Built:
    path, _ = _with_external(lay, "weights.bin")
    os.mkfifo(lay.models / "weights.bin")
    return Built(path)


def b_ext_missing(lay: Layout) -> Built:
    return Built(_with_external(lay, "weights.bin")[0])


def b_sparse_outside(lay: Layout) -> Built:
    """A sparse initializer whose values live in external data outside the folder."""
    model = base_model()
    values = numpy_helper.from_array(np.ones(4, np.float32), "sparse_w")
    _external(values, "../outside/secret.bin")
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "sparse_w_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [16]))
    return Built(save(model, lay.models / "model.onnx"))


def b_sparse_constant_absolute(lay: Layout) -> Built:
    """A Constant node's sparse_value with its indices read from an absolute path (the canary)."""
    model = base_model()
    values = numpy_helper.from_array(np.ones(4, np.float32), "sv")
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "si")
    _external(indices, str(lay.canary))
    node = helper.make_node("Constant", [], ["unused_sparse"], sparse_value=helper.make_sparse_tensor(values, indices, [16]))
    model.graph.node.insert(0, node)
    return Built(save(model, lay.models / "model.onnx"))


# --------------------------------------------------------------------------- graph traps


def b_cycle(lay: Layout) -> Built:
    nodes = [
        helper.make_node("Add", ["input", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["output"]),
    ]
    return Built(save(_tiny_graph(nodes, []), lay.models / "model.onnx"))


def b_dangling(lay: Layout) -> Built:
    model = base_model()
    model.graph.node[0].input[0] = "nobody_makes_this"
    return Built(save(model, lay.models / "model.onnx"))


def b_duplicate_outputs(lay: Layout) -> Built:
    model = base_model()
    model.graph.node[3].output[0] = model.graph.node[0].output[0]
    return Built(save(model, lay.models / "model.onnx"))


def b_opset(version: int) -> Callable[[Layout], Built]:
    def build(lay: Layout) -> Built:
        model = base_model()
        model.opset_import[0].version = version
        return Built(save(model, lay.models / "model.onnx"))

    return build


def b_ir_99(lay: Layout) -> Built:
    model = base_model()
    model.ir_version = 99
    return Built(save(model, lay.models / "model.onnx"))


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint for ints, length-delimited for bytes."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def b_deep_if(lay: Layout) -> Built:
    """If nodes nested 40 deep, encoded by hand (onnx's helpers cannot even build it)."""
    out = _field(1, b"y")  # ValueInfoProto.name
    leaf_node = _field(2, b"y") + _field(4, b"Constant") + _field(5, _field(1, b"value_float") + _field(2, 0) + _field(20, 1))
    leaf = graph = _field(1, leaf_node) + _field(2, b"leaf") + _field(12, out)
    for depth in range(40):
        then = _field(1, b"then_branch") + _field(6, graph) + _field(20, 5)
        other = _field(1, b"else_branch") + _field(6, leaf) + _field(20, 5)
        node = _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, then) + _field(5, other)
        graph = _field(1, node) + _field(2, f"level{depth}".encode()) + _field(12, out)
    model = _field(1, 10) + _field(7, graph) + _field(8, _field(1, b"") + _field(2, 17))
    (lay.models / "model.onnx").write_bytes(model)
    return Built(lay.models / "model.onnx")


def b_deep_loop(lay: Layout) -> Built:
    """Loop bodies nested 30 deep (parses; within our bound) around a Loop that never ends."""
    model = _loop_model()
    for _ in range(30):
        body = helper.make_graph(
            list(model.graph.node),
            "wrap",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4]),
            ],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
            list(model.graph.initializer),
        )
        body.node.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
        model = _tiny_graph([helper.make_node("Loop", ["once", "", "input"], ["output"], body=body)],
                            [numpy_helper.from_array(np.array(1, np.int64), "once")], out_shape=[1, 4])
    return Built(save(model, lay.models / "model.onnx"), calib=_tiny_calib(lay))


def b_unknown_op(lay: Layout) -> Built:
    model = base_model()
    model.graph.node[2].op_type = "EvilRelu"
    model.graph.node[2].domain = "com.evil"
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    return Built(save(model, lay.models / "model.onnx"))


def b_required_input_empty(lay: Layout) -> Built:
    """``Sum(input, input, "")``: passes the onnx checker and session creation, then crashes
    onnxruntime 1.32 (SIGSEGV) on its first run. Found by fuzzing."""
    model = _tiny_graph([helper.make_node("Sum", ["input", "input", ""], ["output"])], [], out_shape=[1, 4])
    return Built(save(model, lay.models / "model.onnx"), calib=_tiny_calib(lay))


def b_split_outputs_outnumber(lay: Layout) -> Built:
    """A Split with ``num_outputs=2`` and three outputs: the onnx checker passes it, and onnx's
    own shape inference aborts the process (a failed C++ assertion). Found by fuzzing."""
    node = helper.make_node("Split", ["input"], ["a", "b", "output"], axis=1, num_outputs=2)
    model = _tiny_graph([node], [], out_shape=[1, 1], opset=18)
    model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("a", "b")])
    return Built(save(model, lay.models / "model.onnx"), calib=_tiny_calib(lay))


def _loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["y_in", "one"], ["y_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((1, 4), np.float32), "one")],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "input"], ["output"], body=body)]
    return _tiny_graph(nodes, [numpy_helper.from_array(np.array(2**62, np.int64), "trips")], out_shape=[1, 4])


def b_huge_loop(lay: Layout) -> Built:
    return Built(save(_loop_model(), lay.models / "model.onnx"), calib=_tiny_calib(lay))


def _giant_constant_of_shape() -> onnx.ModelProto:
    """A ~300-byte model whose first run would allocate 2**36 bytes (64 GiB)."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceMax", ["big"], ["m"], keepdims=0),
        helper.make_node("Add", ["input", "m"], ["output"]),
    ]
    return _tiny_graph(nodes, [numpy_helper.from_array(np.array([2**17, 2**17], np.int64), "shape")], out_shape=[1, 4])


def b_giant_constant_of_shape(lay: Layout) -> Built:
    return Built(save(_giant_constant_of_shape(), lay.models / "model.onnx"), calib=_tiny_calib(lay))


def b_giant_expand_from_input(lay: Layout) -> Built:
    """Expand to a shape computed at run time from the input (no static check can see it)."""
    nodes = [
        helper.make_node("Shape", ["input"], ["s"]),  # [1, 4]
        helper.make_node("Mul", ["s", "factor"], ["target"]),  # [2**15, 2**17]
        helper.make_node("ReduceMax", ["input"], ["one"], keepdims=1),  # [1, 1]
        helper.make_node("Expand", ["one", "target"], ["big"]),
        helper.make_node("ReduceMax", ["big"], ["m"], keepdims=0),
        helper.make_node("Add", ["input", "m"], ["output"]),
    ]
    factor = numpy_helper.from_array(np.array([2**15, 2**15], np.int64), "factor")
    model = _tiny_graph(nodes, [factor], out_shape=[1, 4])
    return Built(save(model, lay.models / "model.onnx"), calib=_tiny_calib(lay))


# --------------------------------------------------------------------------- numerics


def _bad_weight(lay: Layout, value: float, name: str = "conv0.weight") -> Built:
    model = _set_weight(base_model(), name, lambda a: a.reshape(-1).__setitem__(3, value))
    return Built(save(model, lay.models / "model.onnx"))


# --------------------------------------------------------------------------- data


def b_calib(arrays: Callable[[], dict[str, np.ndarray]], name: str = "bad.npz") -> Callable[[Layout], Built]:
    def build(lay: Layout) -> Built:
        path = _calib(lay, arrays(), name)
        return Built(_good(lay), calib=path, names=path)

    return build


def _rng(shape: tuple[int, ...] = (24, 3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(shape).astype(np.float32)


def _with(value: float) -> dict[str, np.ndarray]:
    x = _rng()
    x[5, 1, 2, 3] = value
    return {"input": x}


class _Trap:
    """Unpickling this writes a marker file: the test asserts it never appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.marker), "unpickled!"))


def b_pickle_npz(lay: Layout) -> Built:
    path = lay.data / "pickled.npz"
    buf = io.BytesIO()
    np.save(buf, np.array([_Trap(str(lay.pickle_marker))] * 24, dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("input.npy", buf.getvalue())
    return Built(_good(lay), calib=path, names=path)


def b_raw_pickle_npz(lay: Layout) -> Built:
    """A file named .npz that is a bare pickle (np.load would unpickle it with allow_pickle)."""
    path = lay.data / "raw.npz"
    path.write_bytes(pickle.dumps(_Trap(str(lay.pickle_marker))))
    return Built(_good(lay), calib=path, names=path)


def b_not_zip_npz(lay: Layout) -> Built:
    path = lay.data / "text.npz"
    path.write_text("input,1,2,3\n")
    return Built(_good(lay), calib=path, names=path)


def b_npz_huge_header(lay: Layout) -> Built:
    """An npz whose header declares 2**40 samples but holds 24."""
    path = lay.data / "liar.npz"
    buf = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**40, 3, 8, 8)}
    np.lib.format.write_array_header_1_0(buf, header)
    buf.write(_rng().tobytes())
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("input.npy", buf.getvalue())
    return Built(_good(lay), calib=path, names=path)


def b_near_max(lay: Layout) -> Built:
    """Finite inputs near float32's maximum: the first Conv overflows to inf while calibrating."""
    path = _calib(lay, {"input": np.full((24, 3, 8, 8), 3e38, np.float32)}, "near_max.npz")
    return Built(_good(lay), calib=path)


def b_corrupt_image(lay: Layout) -> Built:
    from PIL import Image

    folder = lay.data / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    bad = folder / "img3.png"
    bad.write_bytes((folder / "img0.png").read_bytes()[:40])
    return Built(_good(lay), calib=folder, names=bad)


def b_data_fifo(lay: Layout) -> Built:
    path = lay.data / "calib.npz"
    os.mkfifo(path)
    return Built(_good(lay), calib=path, names=path)


def b_distill_teacher_hardlink(lay: Layout) -> Built:
    student = _good(lay, "student.onnx")
    teacher, _ = _with_external(lay, "weights.bin")
    os.link(lay.canary, lay.models / "weights.bin")
    return Built(student, teacher=teacher, names=teacher)


def b_distill_nan_data(lay: Layout) -> Built:
    path = _calib(lay, _with(float("nan")), "nan.npz")
    return Built(_good(lay), calib=path, names=path)


# --------------------------------------------------------------------------- outputs


def b_out_is_input(lay: Layout) -> Built:
    model = _good(lay)
    return Built(model, output=model, names=model)


def b_out_hardlink_to_input(lay: Layout) -> Built:
    model = _good(lay)
    os.link(model, lay.out / "alias.onnx")
    return Built(model, output=lay.out / "alias.onnx", names=lay.out / "alias.onnx")


def b_out_directory(lay: Layout) -> Built:
    (lay.out / "result.onnx").mkdir()
    return Built(_good(lay), output=lay.out / "result.onnx", names=lay.out / "result.onnx")


def b_out_missing_folder(lay: Layout) -> Built:
    out = lay.out / "no" / "such" / "result.onnx"
    return Built(_good(lay), output=out, names=out)


def b_out_symlink(lay: Layout) -> Built:
    (lay.out / "result.onnx").symlink_to(lay.canary)
    return Built(_good(lay), output=lay.out / "result.onnx", names=lay.out / "result.onnx")


def b_out_fifo(lay: Layout) -> Built:
    os.mkfifo(lay.out / "result.onnx")
    return Built(_good(lay), output=lay.out / "result.onnx", names=lay.out / "result.onnx")


def b_report_is_file(lay: Layout) -> Built:
    (lay.out / "report").write_text("not a folder")
    return Built(_good(lay), extra=["--report", str(lay.out / "report")], names=lay.out / "report")


def b_out_read_only(lay: Layout) -> Built:
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses file creation
        out = Path("/sys/onnxshrink-result.onnx")
    else:
        folder = lay.out / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "result.onnx"
    return Built(_good(lay), output=out, names=out)


# --------------------------------------------------------------------------- the corpus

B, U = EXIT_BAD_INPUT, EXIT_USAGE
CASES: list[Case] = [
    # not a model
    Case("empty-file", "not-a-model", "inspect", "file is empty", B, b_empty),
    Case("truncated-protobuf", "not-a-model", "int8", "not a valid ONNX protobuf", B, b_truncated),
    Case("random-bytes", "not-a-model", "prune", "not a valid ONNX protobuf", B, b_random_bytes),
    Case("text-file", "not-a-model", "bench", "not a valid ONNX protobuf", B, b_text),
    Case("directory", "not-a-model", "inspect", "is a directory", B, b_directory),
    Case("fifo", "not-a-model", "int8", "not a regular file", B, b_fifo),
    Case("char-device", "not-a-model", "bench", "not a regular file", B, b_char_device),
    Case("symlink-to-outside", "not-a-model", "inspect", "not a valid ONNX protobuf", B, b_symlink_outside),
    Case("missing-file", "not-a-model", "distill", "model file not found", B, b_missing),
    Case("no-graph", "not-a-model", "inspect", "no graph", B, b_no_graph),
    Case("huge-declared-dims", "not-a-model", "int8", "declares shape", B, b_huge_dims),
    Case("negative-dims", "not-a-model", "prune", "negative dimension", B, b_negative_dims),
    Case("huge-input-dims", "not-a-model", "int8", "too large", B, b_huge_input_dims),
    # hostile external data
    Case("ext-absolute", "external-data", "int8", "absolute", B, b_ext_absolute),
    Case("ext-dotdot", "external-data", "prune", "outside the model folder", B, b_ext_dotdot),
    Case("ext-symlink", "external-data", "bench", "symbolic link", B, b_ext_symlink),
    Case("ext-hardlink", "external-data", "inspect", "hard link", B, b_ext_hardlink),
    Case("ext-offset-out-of-range", "external-data", "int8", "exceeds its size", B, b_ext_offset_out_of_range),
    Case("ext-length-mismatch", "external-data", "inspect", "external length", B, b_ext_length_mismatch),
    Case("ext-negative-offset", "external-data", "prune", "negative external offset", B, b_ext_negative_offset),
    Case("ext-non-numeric-offset", "external-data", "inspect", "non-numeric", B, b_ext_non_numeric),
    Case("ext-fifo", "external-data", "bench", "not a regular file", B, b_ext_fifo),
    Case("ext-missing", "external-data", "int8", "not found", B, b_ext_missing),
    Case("sparse-initializer-outside", "external-data", "inspect", "outside the model folder", B, b_sparse_outside),
    Case("sparse-constant-absolute", "external-data", "int8", "absolute", B, b_sparse_constant_absolute),
    Case("distill-teacher-hardlink", "external-data", "distill", "hard link", B, b_distill_teacher_hardlink),
    # graph traps
    Case("cycle", "graph", "int8", "checker", B, b_cycle),
    Case("dangling-input", "graph", "prune", "checker", B, b_dangling),
    Case("duplicate-outputs", "graph", "inspect", "checker", B, b_duplicate_outputs),
    Case("opset-99", "graph", "int8", "newer than", B, b_opset(99)),
    Case("opset-7", "graph", "bench", "older than", B, b_opset(7)),
    Case("ir-version-99", "graph", "inspect", "IR version 99", B, b_ir_99),
    Case("deep-if-nesting", "graph", "inspect", "not a valid ONNX protobuf", B, b_deep_if),
    Case("deep-loop-never-ends", "graph", "prune", "time bound", B, b_deep_loop, isolate=True),
    Case("split-outputs-outnumber", "graph", "int8", "shape inference crashes", B, b_split_outputs_outnumber),
    Case("required-input-empty", "graph", "bench", "required input 2 empty", B, b_required_input_empty),
    Case("unknown-op-domain", "graph", "int8", "onnxruntime cannot load", B, b_unknown_op),
    Case("huge-loop-trip-count", "graph", "int8", "time bound", B, b_huge_loop, isolate=True),
    Case("giant-constant-of-shape", "graph", "bench", "memory bound", B, b_giant_constant_of_shape, isolate=True),
    Case("giant-expand-from-input", "graph", "int8", "memory bound", B, b_giant_expand_from_input, isolate=True),
    # numerics
    Case("inf-weight-int8", "numeric", "int8", "NaN or infinite", B, lambda lay: _bad_weight(lay, float("inf"))),
    Case("nan-weight-int8", "numeric", "int8", "NaN or infinite", B, lambda lay: _bad_weight(lay, float("nan"))),
    Case("nan-weight-prune", "numeric", "prune", "NaN or infinite", B, lambda lay: _bad_weight(lay, float("nan"))),
    Case("inf-weight-magnitude", "numeric", "magnitude", "NaN or infinite", B, lambda lay: _bad_weight(lay, float("-inf"), "fc.weight")),
    # bad data
    Case("calib-wrong-name", "data", "int8", "has no array for model input", B, b_calib(lambda: {"image": _rng()})),
    Case("calib-wrong-shape", "data", "int8", "the model expects", B, b_calib(lambda: {"input": _rng((24, 3, 9, 9))})),
    Case("calib-wrong-dtype", "data", "prune", "model expects float32", B, b_calib(lambda: {"input": np.ones((24, 3, 8, 8), np.int32)})),
    Case("calib-nan", "data", "int8", "NaN or infinite", B, b_calib(lambda: _with(float("nan")))),
    Case("calib-inf", "data", "magnitude", "NaN or infinite", B, b_calib(lambda: _with(float("inf")))),
    Case("calib-empty", "data", "int8", "holds no samples", B, b_calib(lambda: {"input": np.zeros((0, 3, 8, 8), np.float32)})),
    Case("calib-no-arrays", "data", "int8", "has no array for model input", B, b_calib(lambda: {})),
    Case("calib-pickle-member", "data", "int8", "object arrays are not allowed", B, b_pickle_npz),
    Case("calib-raw-pickle", "data", "bench", "not a readable .npz", B, b_raw_pickle_npz),
    Case("calib-not-zip", "data", "int8", "not a readable .npz", B, b_not_zip_npz),
    Case("calib-huge-header", "data", "int8", "forged header", B, b_npz_huge_header),
    Case("calib-corrupt-image", "data", "int8", "cannot read image", B, b_corrupt_image),
    Case("calib-fifo", "data", "int8", "regular file", B, b_data_fifo),
    Case("calib-outlier-dominated", "data", "int8", "dominated by an outlier", B, b_calib(lambda: _with(1e30))),
    Case("calib-near-float-max", "numeric", "int8", "NaN or infinite during calibration", B, b_near_max),
    Case("distill-nan-data", "data", "distill", "NaN or infinite", B, b_distill_nan_data),
    # outputs
    Case("out-is-input", "output", "int8", "overwrite the input", B, b_out_is_input),
    Case("out-hardlink-to-input", "output", "prune", "overwrite the input", B, b_out_hardlink_to_input),
    Case("out-is-directory", "output", "int8", "directory", U, b_out_directory),
    Case("out-missing-folder", "output", "int8", "output folder does not exist", B, b_out_missing_folder),
    Case("out-symlink", "output", "prune", "symbolic link", B, b_out_symlink),
    Case("out-fifo", "output", "int8", "not a regular file", B, b_out_fifo),
    Case("out-read-only-folder", "output", "int8", "cannot write", B, b_out_read_only),
    Case("distill-out-symlink", "output", "distill", "symbolic link", B, b_out_symlink),
    Case("distill-out-is-student", "output", "distill", "overwrite", B, b_out_is_input),
    Case("bench-report-dir-is-file", "output", "bench", "report", U, b_report_is_file),
]
